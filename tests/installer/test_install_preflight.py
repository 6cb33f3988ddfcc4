"""What the probes mean for a host, the checks, their overrides, and the model store plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.installer import parsers, preflight, storage

HOSTS = Path(__file__).resolve().parent.parent / "fixtures" / "hosts"
PROBE_MODULE = (
    Path(__file__).resolve().parents[2] / "playbooks/roles/preflight/library/appliance_probe.py"
)
UBUNTU = {"distribution": "Ubuntu", "version": "22.04", "major": "22"}


def probe(host: str, **overrides: Any) -> dict[str, Any]:
    """The registered results the preflight role hands over, built from the fixture outputs."""

    def result(name: str, rc: int = 0) -> dict[str, Any]:
        path = HOSTS / host / name
        if not path.exists():  # what Ansible's command module reports for a missing tool
            return {
                "rc": 2,
                "stdout": "",
                "stderr": "",
                "msg": "[Errno 2] No such file or directory",
            }
        return {"rc": rc, "stdout": path.read_text(), "stderr": ""}

    mok = (HOSTS / host / "mokutil.txt").read_text()
    out = {
        "lspci": result("lspci.txt"),
        "smi_query": result("nvidia-smi-query.csv"),
        "smi_topo": result("nvidia-smi-topo.txt"),
        "lsblk": result("lsblk.json"),
        "mokutil": {"rc": 255, "stdout": "", "stderr": mok}
        if "not supported" in mok
        else {"rc": 0, "stdout": mok, "stderr": ""},
        "ss": {"rc": 0, "stdout": "LISTEN 0 4096 0.0.0.0:22 0.0.0.0:*\n", "stderr": ""},
        "timedatectl": {"rc": 0, "stdout": "NTP=yes\nNTPSynchronized=yes\n", "stderr": ""},
        "kernel": "5.15.0-131-generic",
        "kernel_headers": True,
        "os": UBUNTU,
    }
    out.update(overrides)
    return out


def checks(facts: preflight.HostFacts, **settings: Any) -> dict[str, preflight.Finding]:
    base: dict[str, Any] = {"driver_version": "580.95.05", "ports": [443, 6379]}
    return {f.check: f for f in preflight.findings(facts, {**base, **settings})}


def test_h100_hgx_passes() -> None:
    facts = preflight.host_facts(probe("h100-hgx"))
    assert (facts.gpu_count, facts.nvswitches, facts.driver_state) == (8, 4, "loaded")
    assert facts.gpu_models == ["NVIDIA H100 80GB HBM3"]
    assert facts.fully_nvlinked is True
    found = checks(facts)
    assert {f.status for f in found.values()} == {"ok"}, found
    assert found["driver"].detail == "driver 550.90.07 loaded; nvidia_driver installs 580.95.05"
    assert found["model_store"].detail.startswith("8 disks (/dev/nvme2n1, /dev/nvme3n1,")
    assert "/dev/nvme0n1 has nvme0n1p1 (vfat), nvme0n1p2 (linux_raid_member)" in (
        found["model_store"].detail
    )


def test_h200_secure_boot_fails_with_the_fix_and_can_be_accepted() -> None:
    facts = preflight.host_facts(probe("h200-hgx"))
    found = checks(facts)
    assert found["secure_boot"].status == "fail"
    assert "mokutil --import" in found["secure_boot"].fix
    message = preflight.failure_message("gpu02", list(found.values()))
    assert message.splitlines()[0] == "preflight failed on gpu02:"
    assert "- secure_boot: Secure Boot is on" in message
    accepted = checks(facts, accept=["secure_boot"])
    assert accepted["secure_boot"].status == "warn"
    assert accepted["secure_boot"].detail.endswith("(accepted by preflight_accept)")


def test_no_gpu_host() -> None:
    facts = preflight.host_facts(probe("no-gpu"))
    assert (facts.gpu_count, facts.secure_boot, facts.driver_state) == (0, "unsupported", "absent")
    found = checks(facts)
    assert found["gpus"].status == "fail"
    assert "preflight_require_gpus: false" in found["gpus"].fix
    assert checks(facts, require_gpus=False)["gpus"].detail == "no GPU (CPU-only host)"
    # A virtio disk is no automatic candidate: only NVMe disks are picked without being named.
    assert found["model_store"].status == "fail"
    assert found["model_store"].detail == "no empty NVMe disk for the model store"
    named = preflight.host_facts(probe("no-gpu"), {"devices": ["/dev/vdb"]})
    assert checks(named)["model_store"].detail == "/dev/vdb becomes XFS (536.9 GB)"
    assert checks(facts, model_store_enabled=False)["model_store"].status == "ok"


def test_fresh_host_without_a_driver() -> None:
    facts = preflight.host_facts(probe("h100-pcie"))
    assert (facts.gpu_count, facts.driver_state, facts.driver_version) == (2, "absent", None)
    found = checks(facts)
    assert found["driver"].detail == "no driver yet; nvidia_driver installs 580.95.05"
    assert found["nvlink"].detail.startswith("no NVLink between GPUs (PCIe only)")


def test_driver_installed_but_not_loaded() -> None:
    failed = {
        "rc": 9,
        "stdout": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
        "driver. Make sure that the latest NVIDIA driver is installed and running.\n",
        "stderr": "",
    }
    facts = preflight.host_facts(probe("h100-pcie", smi_query=failed))
    assert facts.driver_state == "not_loaded"
    assert checks(facts)["driver"].status == "warn"


def test_missing_lspci_is_reported() -> None:
    missing = {"rc": 2, "stdout": "", "msg": "[Errno 2] No such file or directory: b'lspci'"}
    facts = preflight.host_facts(probe("h100-pcie", lspci=missing))
    assert facts.lspci_missing
    found = checks(facts)
    assert found["gpus"].status == "fail"
    assert "pciutils" in found["gpus"].fix


def test_expected_gpu_count() -> None:
    facts = preflight.host_facts(probe("h100-hgx"))
    found = checks(facts, expected_gpu_count=8)
    assert found["gpus"].status == "ok"
    missing = checks(facts, expected_gpu_count=9)["gpus"]
    assert (missing.status, missing.detail) == ("fail", "8 GPUs found, 9 expected")


def test_nvlinked_baseboard_without_known_switch_ids() -> None:
    lspci = (HOSTS / "h100-hgx" / "lspci.txt").read_text()
    only_gpus = "".join(line for line in lspci.splitlines(True) if "NVSwitch" not in line)
    facts = preflight.host_facts(probe("h100-hgx", lspci={"rc": 0, "stdout": only_gpus}))
    found = checks(facts)
    assert found["nvlink"].status == "warn"
    assert "nvidia_driver_nvswitch: true" in found["nvlink"].fix


def test_ports_and_time() -> None:
    busy = {"rc": 0, "stdout": "LISTEN 0 511 0.0.0.0:443 0.0.0.0:*\n"}
    facts = preflight.host_facts(probe("h100-hgx", ss=busy))
    found = checks(facts)
    assert (found["ports"].status, found["ports"].detail) == (
        "fail",
        "port(s) 443 already in use by another service",
    )
    # On a re-run the appliance itself holds its ports.
    assert checks(facts, appliance_installed=True)["ports"].status == "ok"
    # doctor --local: the appliance running here holds 443 itself.
    own = checks(facts, own_ports=[443, 8000])["ports"]
    assert (own.status, own.detail) == (
        "ok",
        "6379 available; 443 held by the appliance running here",
    )
    both = {"rc": 0, "stdout": "LISTEN 0 511 0.0.0.0:443 0.0.0.0:*\nLISTEN 0 5 [::]:6379 [::]:*\n"}
    other = checks(preflight.host_facts(probe("h100-hgx", ss=both)), own_ports=[443])["ports"]
    assert (other.status, other.detail) == (
        "fail",
        "port(s) 6379 already in use by another service",
    )
    unsynced = {"rc": 0, "stdout": "NTP=no\nNTPSynchronized=no\n"}
    found = checks(preflight.host_facts(probe("h100-hgx", timedatectl=unsynced)))
    assert found["time_sync"].status == "fail"
    assert "timedatectl set-ntp true" in found["time_sync"].fix


def test_unsupported_os() -> None:
    facts = preflight.host_facts(
        probe("h100-hgx", os={"distribution": "CentOS", "version": "7.9", "major": "7"})
    )
    found = checks(facts)
    assert (found["os"].status, found["os"].detail) == ("fail", "CentOS 7.9 is not a supported OS")


def test_unreadable_probe_is_a_warning_not_a_crash() -> None:
    facts = preflight.host_facts(probe("h100-hgx", smi_topo={"rc": 0, "stdout": "garbage\n"}))
    assert facts.fully_nvlinked is None
    found = checks(facts)
    assert found["probes"].status == "warn"
    assert "nvidia-smi topo -m" in found["probes"].detail


def test_every_check_is_reported_once() -> None:
    for host in ("h100-hgx", "h200-hgx", "h200-nvl", "h100-pcie", "no-gpu"):
        names = [f.check for f in preflight.findings(preflight.host_facts(probe(host)), {})]
        assert names == list(preflight.CHECKS), host


# --- the model store plan ---------------------------------------------------------------------


def disks(host: str) -> list[parsers.BlockDevice]:
    return parsers.parse_lsblk((HOSTS / host / "lsblk.json").read_text())


def test_store_refuses_a_disk_with_a_filesystem_unless_forced() -> None:
    plan = storage.plan_store(disks("h200-hgx"), ["/dev/nvme1n1", "/dev/nvme2n1"])
    assert plan.layout == "none"
    (problem,) = plan.problems
    assert problem.startswith("/dev/nvme2n1 holds xfs (label scratch): the installer never")
    assert "wipefs -a /dev/nvme2n1" in problem
    forced = storage.plan_store(disks("h200-hgx"), ["/dev/nvme1n1", "/dev/nvme2n1"], force=True)
    assert (forced.layout, forced.target) == ("raid0", "/dev/md/appliance-models")


def test_store_never_touches_a_mounted_disk_even_forced() -> None:
    plan = storage.plan_store(disks("h200-hgx"), ["/dev/nvme0n1"], force=True)
    assert plan.problems == [
        "/dev/nvme0n1p1 is mounted at /boot/efi: the installer never touches a disk in use"
    ]
    part = storage.plan_store(disks("h200-hgx"), ["/dev/nvme0n1p3"])
    assert part.problems == ["/dev/nvme0n1p3 is a part, not a whole disk"]
    assert storage.plan_store(disks("h200-hgx"), ["/dev/sdz"]).problems == [
        "/dev/sdz is not a block device on this host"
    ]


def test_store_single_disk() -> None:
    plan = storage.plan_store(disks("h100-pcie"))
    assert (plan.layout, plan.devices, plan.target) == ("single", ["/dev/nvme0n1"], "/dev/nvme0n1")
    assert plan.describe() == "/dev/nvme0n1 becomes XFS (3.8 TB)"


def _with(host: str, path: str, **changes: Any) -> list[parsers.BlockDevice]:
    data = json.loads((HOSTS / host / "lsblk.json").read_text())
    for dev in data["blockdevices"]:
        if dev["path"] == path:
            dev.update(changes)
    return parsers.parse_lsblk(json.dumps(data))


def test_store_found_again_on_a_rerun() -> None:
    mounted = _with("h100-pcie", "/dev/nvme0n1", fstype="xfs", label="appliance",
                    mountpoints=["/srv/appliance/models"])  # fmt: skip
    plan = storage.plan_store(mounted)
    assert (plan.layout, plan.target, plan.problems) == ("existing", "/dev/nvme0n1", [])
    # Not mounted (a reboot with the disk late): found by its label, not formatted again.
    labelled = _with("h100-pcie", "/dev/nvme0n1", fstype="xfs", label="appliance")
    assert storage.plan_store(labelled, ["/dev/nvme0n1"]).layout == "existing"


@pytest.mark.parametrize(
    ("wipefs", "found"),
    [
        ("", []),
        (
            '{"signatures": [{"device": "loop1", "offset": "0x438", "type": "ext4", '
            '"uuid": "5f6e346a-893a-477b-94b9-181d21a60edf", "label": "precious"}]}',
            ["/dev/loop1 holds ext4 (label precious)"],
        ),
        (
            '{"signatures": [{"device": "/dev/sdb", "offset": "0x200", "type": "gpt"}, '
            '{"device": "/dev/sdb", "offset": "0x1fffffe00", "type": "gpt"}]}',
            ["/dev/sdb holds gpt"],
        ),
    ],
)
def test_wipefs_signatures(wipefs: str, found: list[str]) -> None:
    assert storage.signatures(wipefs) == found


def test_probe_module_results_are_what_the_checks_read(tmp_path: Path) -> None:
    """The preflight role's probe module, run as Ansible runs it on a host: here with an
    lspci that finds nothing and an nvidia-smi that cannot reach a driver (fakes first on
    PATH); the tools this machine lacks come back as "command not found"."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "lspci").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "nvidia-smi").write_text(
        "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the "
        'NVIDIA driver."\nexit 9\n'
    )
    for tool in bindir.iterdir():
        tool.chmod(0o755)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"kernel": "no-such-kernel"}}))
    path = f"{bindir}:{os.environ['PATH']}"
    proc = subprocess.run(
        [sys.executable, str(PROBE_MODULE), str(args)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] is False
    found = result["probe"]
    assert found["lspci"] == {"rc": 0, "stdout": "", "stderr": "", "cmd": "lspci -Dnn -d 10de:"}
    assert found["smi_query"]["rc"] == 9
    assert found["smi_topo"] == {"skipped": True}  # only asked when the query worked
    assert found["kernel_headers"] is False
    sbin = "/usr/local/sbin:/usr/sbin:/sbin"  # where Ansible also looks
    for key, tool in (("mokutil", "mokutil"), ("ss", "ss"), ("timedatectl", "timedatectl")):
        if shutil.which(tool, path=f"{path}:{sbin}") is None:
            assert found[key]["rc"] == preflight.MISSING
            assert "No such file or directory" in found[key]["msg"]
        else:
            assert found[key]["rc"] != preflight.MISSING and "stdout" in found[key]
    facts = preflight.host_facts({**found, "kernel": "no-such-kernel", "os": UBUNTU})
    assert facts.gpu_count == 0 and not facts.lspci_missing
    assert facts.driver_state == "not_loaded"
    assert facts.errors == []
