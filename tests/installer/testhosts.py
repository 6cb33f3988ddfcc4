"""Throwaway hosts on this machine for running the playbooks for real.

A host is a Debian 12 root (debootstrapped once into CACHE and reused) seen through an
overlay mount, so every test session starts from the same pristine system and nothing it
changes survives. Ansible reaches it with the community.general.chroot connection. Disks
are loop devices on sparse files; firewall rules are loaded in network namespaces made
for the test. Everything made here is undone by its own handle: mounts by path, loop
devices by name, namespaces by name, processes by pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/cache/appliance-tests"))
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# What every real host has and a minbase root lacks: Python for Ansible, systemd for
# the units, iproute2 for network facts, pciutils for the GPU probe.
INCLUDE = "python3,python3-apt,systemd,iproute2,pciutils"
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hosts"


def run(
    *argv: str, check: bool = True, timeout: float | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=check, timeout=timeout, env=env
    )


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "needs root: chroot, overlay mounts, loop devices and network namespaces "
            "(run the tests as root to include the installer tests)"
        )


# The programs the installer tests run on this machine (not inside the test host, whose
# packages the playbooks install), with the Debian package of each. A Debian 12 container
# or minimal install has coreutils, mount and util-linux but often not the others.
HOST_TOOLS = {
    "chroot": "coreutils",
    "mount": "mount",
    "umount": "mount",
    "losetup": "mount",
    "findmnt": "util-linux",
    "mountpoint": "util-linux",
    "blkid": "util-linux",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "nft": "nftables",
    "mkfs.ext4": "e2fsprogs",
    "mdadm": "mdadm",
    "systemd-analyze": "systemd",
    # The observability tests: Debian's Prometheus and its promtool.
    "prometheus": "prometheus",
    "promtool": "prometheus",
}
# Set to 1 to have missing tools skip their tests instead of being installed.
NO_INSTALL_ENV = "APPLIANCE_TEST_NO_INSTALL"
_apt_updated = False
# One apt-get at a time: the installer tests' downloads run in a thread beside the tests
# (tests/conftest.py), and dpkg's lock refuses a second apt-get rather than waiting.
_apt_lock = threading.Lock()


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return run("apt-get", *args, check=False, timeout=900, env=env)


def require_tools(*tools: str) -> None:
    """Make sure these programs exist: installed with apt-get when this runs as root on a
    machine with apt (unless $APPLIANCE_TEST_NO_INSTALL=1), else the test is skipped with
    the reason and the package to install."""
    with _apt_lock:
        _require_tools(tools)


def _require_tools(tools: tuple[str, ...]) -> None:
    global _apt_updated
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted({HOST_TOOLS[tool] for tool in missing})
    names = ", ".join(f"{tool} (Debian package {HOST_TOOLS[tool]})" for tool in missing)
    how = f"apt-get install {' '.join(packages)}"
    if os.environ.get(NO_INSTALL_ENV) == "1":
        pytest.skip(f"needs {names}; {NO_INSTALL_ENV}=1 forbids installing it: run `{how}`")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"needs {names}; run `{how}`, or run the tests as root where apt-get is")
    args = ("install", "-y", "--no-install-recommends", *packages)
    proc = _apt_get(*args)
    if proc.returncode != 0 and not _apt_updated:
        # A fresh machine may have no package lists yet.
        _apt_updated = True
        _apt_get("update")
        proc = _apt_get(*args)
    still = [tool for tool in missing if shutil.which(tool) is None]
    if still:
        tail = (proc.stderr or proc.stdout).strip()[-600:]
        pytest.skip(f"needs {names}; `{how}` did not provide {', '.join(still)}: {tail}")


def mirror_reachable() -> bool:
    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/{SUITE}/Release", timeout=15) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def debian_root() -> Path:
    """The pristine Debian 12 root, debootstrapped on first use and reused afterwards."""
    root = CACHE / SUITE
    if (root / "etc/debian_version").is_file() and (root / ".complete").is_file():
        return root
    if not mirror_reachable():
        pytest.skip(f"the Debian mirror {MIRROR} is unreachable; cannot debootstrap a test host")
    require_tools("debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".{SUITE}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    proc = run(
        "debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(partial), MIRROR,
        check=False, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (partial / ".complete").write_text("debootstrap " + SUITE + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return root


def _dependencies() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def wheelhouse_dir() -> Path:
    """The appliance's dependencies as CPython 3.11 wheels, downloaded once and reused."""
    from appliance.installer import bundle as bundles

    deps = _dependencies()
    key = hashlib.sha256("\n".join(sorted(deps)).encode()).hexdigest()[:12]
    path = CACHE / f"wheels-cp311-{key}"
    if (path / ".complete").is_file():
        return path
    partial = CACHE / f".wheels-cp311-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    platforms = [a for p in bundles.PLATFORMS for a in ("--platform", p)]
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--dest", str(partial),
            "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            *platforms, *deps,
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot download the appliance's dependencies: {proc.stderr[-800:]}")
    (partial / ".complete").write_text("\n".join(deps) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    for stale in CACHE.glob("wheels-cp311-*"):  # made for an older dependency list
        if stale != path:
            shutil.rmtree(stale, ignore_errors=True)
    return path


# The installer tests' downloads (minutes of network, little CPU on a fresh machine),
# started in threads when the session's tests are known, so that they overlap the tests
# that run before the installer tests (tests/conftest.py puts those last).
_DOWNLOADS: dict[str, Callable[[], Path]] = {"debian": debian_root, "wheels": wheelhouse_dir}
_prefetch: ThreadPoolExecutor | None = None
_prefetched: dict[str, Future[Path]] = {}


def start_downloads() -> None:
    """Begin the downloads in the background, as root only (the tests skip otherwise)."""
    global _prefetch
    if os.geteuid() != 0 or _prefetch is not None:
        return
    _prefetch = ThreadPoolExecutor(max_workers=len(_DOWNLOADS), thread_name_prefix="prefetch")
    for name, download in _DOWNLOADS.items():
        _prefetched[name] = _prefetch.submit(download)


def downloaded(name: str) -> Path:
    """The download's result, waiting for it if it was started in the background (its
    skip or error raised here, in the test that needs it), or made now if it was not."""
    future = _prefetched.get(name)
    return future.result() if future is not None else _DOWNLOADS[name]()


def finish_downloads() -> None:
    """Never leave debootstrap or pip running behind the session."""
    if _prefetch is not None:
        _prefetch.shutdown(wait=True)


def _is_mount(path: Path) -> bool:
    return run("mountpoint", "-q", str(path), check=False).returncode == 0


@contextlib.contextmanager
def overlay_host(lower: Path, workdir: Path, *, devices: bool = True) -> Iterator[Path]:
    """A writable copy of `lower` at workdir/root with /proc, /sys and /dev mounted inside."""
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "root"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    mounts: list[Path] = []
    try:
        run(
            "mount", "-t", "overlay", "overlay",
            "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged),
        )  # fmt: skip
        mounts.append(merged)
        # Private: nothing mounted inside (the model store) may propagate to the machine.
        run("mount", "--make-private", str(merged))
        if devices:
            for fs, target, opts in (
                ("proc", "proc", ["-t", "proc"]),
                ("sysfs", "sys", ["-t", "sysfs"]),
                ("/dev", "dev", ["--bind"]),
            ):
                path = merged / target
                path.mkdir(parents=True, exist_ok=True)
                run("mount", *opts, fs, str(path))
                run("mount", "--make-private", str(path))
                mounts.append(path)
        shutil.copyfile("/etc/resolv.conf", merged / "etc/resolv.conf")
        yield merged
    finally:
        for path in reversed(mounts):
            # Anything the playbook mounted inside (the model store) goes first.
            inner = run("findmnt", "-rn", "-o", "TARGET", "-R", str(path), check=False)
            for target in reversed(inner.stdout.split()):
                if target != str(path):
                    run("umount", "-l", target, check=False)
            run("umount", "-l", str(path), check=False)


@contextlib.contextmanager
def loop_devices(workdir: Path, count: int, size_mib: int = 512) -> Iterator[list[str]]:
    """`count` loop devices on sparse files, detached afterwards."""
    devices: list[str] = []
    try:
        for i in range(count):
            image = workdir / f"disk{i}.img"
            with image.open("wb") as f:
                f.truncate(size_mib * 2**20)
            devices.append(run("losetup", "--find", "--show", str(image)).stdout.strip())
        yield devices
    finally:
        for dev in devices:
            run("losetup", "--detach", dev, check=False)


@contextlib.contextmanager
def netns(*names: str) -> Iterator[list[str]]:
    made: list[str] = []
    try:
        for name in names:
            run("ip", "netns", "add", name)
            made.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        yield made
    finally:
        for name in made:
            run("ip", "netns", "delete", name, check=False)


def gathered_facts(root: Path, env: dict[str, str]) -> dict[str, object]:
    """Facts of a chroot host as the setup module reports them (for the fixture hosts)."""
    proc = run(
        "ansible", "all", "-i", f"{root},", "-c", "community.general.chroot",
        "-e", "ansible_python_interpreter=/usr/bin/python3", "-m", "ansible.builtin.setup",
        "-o", env={**os.environ, **env}, timeout=300,
    )  # fmt: skip
    text = proc.stdout.split("=>", 1)[1]
    return dict(json.loads(text)["ansible_facts"])


FAKE_NVIDIA_SMI = """#!/bin/sh
# Fake nvidia-smi for the installer tests: prints the fixture host's outputs.
d=/usr/local/share/appliance-fixture
case "$*" in
  *--query-gpu=*) exec cat "$d/nvidia-smi-query.csv" ;;
  "topo -m") exec cat "$d/nvidia-smi-topo.txt" ;;
  "-q") exec cat "$d/nvidia-smi-q.txt" ;;
esac
echo "fake nvidia-smi: unexpected arguments: $*" >&2
exit 2
"""
FAKE_CAT = """#!/bin/sh
# Fake {name} for the installer tests: prints the fixture host's output.
cat /usr/local/share/appliance-fixture/{file}
exit {rc}
"""


def make_gpu_host(upper: Path, fixture: str) -> None:
    """Put fake nvidia-smi, lspci, lsblk and mokutil of a fixture host into an overlay."""
    src = FIXTURES / fixture
    share = upper / "usr/local/share/appliance-fixture"
    bindir = upper / "usr/local/bin"
    share.mkdir(parents=True, exist_ok=True)
    bindir.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, share / f.name)
    tools = {"lspci": ("lspci.txt", 0), "lsblk": ("lsblk.json", 0)}
    mok = (src / "mokutil.txt").read_text()
    tools["mokutil"] = ("mokutil.txt", 255 if "not supported" in mok else 0)
    for name, (file, rc) in tools.items():
        (bindir / name).write_text(FAKE_CAT.format(name=name, file=file, rc=rc))
    # The fixture disks are empty: wipefs finds no signature on them.
    (bindir / "wipefs").write_text(
        "#!/bin/sh\n# Fake wipefs: the fixture disks hold nothing.\nexit 0\n"
    )
    if (src / "nvidia-smi-query.csv").exists():
        (bindir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    for tool in bindir.iterdir():
        tool.chmod(0o755)
