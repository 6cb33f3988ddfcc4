"""The GPU roles in check mode against fixture hosts: which packages and steps each host gets.

Each fixture host is the Debian test root under its own overlay, with fake nvidia-smi,
lspci, lsblk, mokutil and wipefs that print the fixture outputs (tests/fixtures/hosts, in
the formats real machines print), and the OS facts of the distribution it stands for. The
preflight, nvidia_driver, container_runtime, model_store and monitoring roles run through
the installer's driver in check mode, as `appliance install --check` does; nothing is written
to the hosts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.installer.runner import RunRequest, RunResult, run_playbook
from tests.installer.testhosts import make_gpu_host, overlay_host

pytestmark = pytest.mark.installer

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
OS_FACTS = {
    "ubuntu2204": {
        "distribution": "Ubuntu", "distribution_version": "22.04",
        "distribution_major_version": "22", "distribution_release": "jammy",
        "os_family": "Debian", "pkg_mgr": "apt", "kernel": "5.15.0-131-generic",
    },
    "ubuntu2404": {
        "distribution": "Ubuntu", "distribution_version": "24.04",
        "distribution_major_version": "24", "distribution_release": "noble",
        "os_family": "Debian", "pkg_mgr": "apt", "kernel": "6.8.0-51-generic",
    },
    "debian12": {
        "distribution": "Debian", "distribution_version": "12.9",
        "distribution_major_version": "12", "distribution_release": "bookworm",
        "os_family": "Debian", "pkg_mgr": "apt", "kernel": "6.1.0-28-amd64",
    },
    "rhel9": {
        "distribution": "RedHat", "distribution_version": "9.5",
        "distribution_major_version": "9", "distribution_release": "Plow",
        "os_family": "RedHat", "pkg_mgr": "dnf", "kernel": "5.14.0-503.11.1.el9_5.x86_64",
    },
}  # fmt: skip
SB = "secure_boot"
HOSTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "h100-hgx-ubuntu2204": ("h100-hgx", "ubuntu2204", {}),
    "h100-hgx-rhel9": ("h100-hgx", "rhel9", {}),
    # Secure Boot is on there: accepted, to show the override (and the rest of the plan).
    "h200-hgx-ubuntu2404": ("h200-hgx", "ubuntu2404", {"preflight_accept": ["ports", SB]}),
    "h200-nvl-debian12": ("h200-nvl", "debian12", {}),
    "h100-pcie-rhel9": ("h100-pcie", "rhel9", {}),
    "no-gpu-debian12": (
        "no-gpu", "debian12", {"preflight_require_gpus": False, "model_store_devices": ["/dev/vdb"]}
    ),
}  # fmt: skip
WRAPPER = """---
# Test only: give each fixture host the OS facts of the distribution it stands for, then
# run the installer's site.yml. With fact gathering "smart", site.yml keeps these facts.
- name: Pretend to be the fixture hosts' distributions
  hosts: appliance
  tasks:
    - name: Set the OS facts of the fixture host
      tags: [always]
      ansible.builtin.set_fact:
        cacheable: true
        distribution: "{{{{ fixture_os.distribution }}}}"
        distribution_version: "{{{{ fixture_os.distribution_version }}}}"
        distribution_major_version: "{{{{ fixture_os.distribution_major_version }}}}"
        distribution_release: "{{{{ fixture_os.distribution_release }}}}"
        os_family: "{{{{ fixture_os.os_family }}}}"
        pkg_mgr: "{{{{ fixture_os.pkg_mgr }}}}"
        kernel: "{{{{ fixture_os.kernel }}}}"

- name: Run the installer
  ansible.builtin.import_playbook: {site}
"""


@dataclass
class CheckRun:
    result: RunResult
    uppers: dict[str, Path]
    events: list[dict[str, Any]]

    def messages(self, host: str, task: str) -> list[str]:
        return [
            str(e["event_data"]["res"].get("msg"))
            for e in self.events
            if e.get("event") == "runner_on_ok"
            and e["event_data"].get("host") == host
            and e["event_data"].get("task") == task
        ]

    def findings(self, host: str) -> dict[str, dict[str, str]]:
        return {f["check"]: f for f in self.result.tracker.findings[host]}


@pytest.fixture(scope="module")
def check_run(tmp_path_factory: pytest.TempPathFactory, debian: Path) -> Iterator[CheckRun]:
    work = tmp_path_factory.mktemp("gpu-check")
    playbooks = work / "playbooks"
    playbooks.mkdir()
    (playbooks / "site.yml").write_text(WRAPPER.format(site=PLAYBOOKS / "site.yml"))
    for name in ("roles", "filter_plugins"):
        (playbooks / name).symlink_to(PLAYBOOKS / name)
    with ExitStack() as stack:
        hosts: dict[str, Any] = {}
        uppers: dict[str, Path] = {}
        for name, (fixture, os_name, extra) in HOSTS.items():
            root = stack.enter_context(overlay_host(debian, work / name))
            uppers[name] = work / name / "upper"
            make_gpu_host(uppers[name], fixture)
            if os_name == "rhel9":
                (uppers[name] / "etc/yum.repos.d").mkdir(parents=True)
            hosts[name] = {
                "ansible_connection": "community.general.chroot",
                "ansible_host": str(root),
                "ansible_python_interpreter": "/usr/bin/python3",
                "fixture_os": OS_FACTS[os_name],
                # The hosts share this machine's network, where other tests may hold ports.
                "preflight_accept": ["ports"],
                # The RHEL stand-ins are Debian inside: their package manager cannot run.
                "model_store_enabled": os_name != "rhel9",
                **extra,
            }
        inventory = work / "inventory.yml"
        # In HOSTS's order: the first, an Ubuntu HGX, is the head (monitoring's Prometheus).
        inventory.write_text(
            yaml.safe_dump({"all": {"children": {"appliance": {"hosts": hosts}}}}, sort_keys=False)
        )
        run_dir = work / "run"
        run_dir.mkdir()
        events: list[dict[str, Any]] = []
        result = run_playbook(
            RunRequest(
                run_dir=run_dir,
                inventory=inventory,
                check=True,
                diff=True,
                tags=[
                    "preflight",
                    "nvidia_driver",
                    "container_runtime",
                    "model_store",
                    "monitoring",
                ],
                env={"ANSIBLE_GATHERING": "smart"},
                playbooks=playbooks,
            ),
            events.append,
        )
        yield CheckRun(result, uppers, events)


def test_check_run_succeeds_on_every_fixture_host(check_run: CheckRun) -> None:
    assert check_run.result.tracker.failures == [], check_run.result.tracker.failures
    assert sorted(check_run.result.tracker.hosts) == sorted(HOSTS)
    assert check_run.result.ok


def test_check_mode_writes_nothing_to_the_hosts(check_run: CheckRun) -> None:
    # The overlay's upper layer holds every file written; apt's own caches and logs under
    # /var are apt simulating, not the installer changing the system.
    for name, upper in check_run.uppers.items():
        written = sorted(
            str(p.relative_to(upper))
            for top in ("etc", "opt", "srv", "boot", "usr")
            for p in (upper / top).rglob("*")
            if p.is_file() and not str(p.relative_to(upper)).startswith("usr/local/")
        )
        assert written == ["etc/resolv.conf"], f"{name} was written to: {written}"


@pytest.mark.parametrize(
    ("host", "packages", "fabric", "stream"),
    [
        (
            "h100-hgx-ubuntu2204",
            ["nvidia-headless-580-open", "nvidia-utils-580", "nvidia-compute-utils-580"],
            ["nvidia-fabricmanager-580", "libnvidia-nscq-580"],
            None,
        ),
        (
            "h200-hgx-ubuntu2404",
            ["nvidia-headless-580-open", "nvidia-utils-580", "nvidia-compute-utils-580"],
            ["nvidia-fabricmanager-580", "libnvidia-nscq-580"],
            None,
        ),
        (
            "h100-hgx-rhel9",
            ["kmod-nvidia-open-dkms", "nvidia-driver-cuda", "nvidia-persistenced"],
            ["nvidia-fabric-manager", "libnvidia-nscq-580"],
            "nvidia-driver:580-open",
        ),
        (
            "h200-nvl-debian12",
            ["nvidia-kernel-open-dkms", "nvidia-driver-cuda", "nvidia-persistenced"],
            [],
            None,
        ),
        (
            "h100-pcie-rhel9",
            ["kmod-nvidia-open-dkms", "nvidia-driver-cuda", "nvidia-persistenced"],
            [],
            "nvidia-driver:580-open",
        ),
    ],
)
def test_driver_plan_per_gpu_and_os(
    check_run: CheckRun, host: str, packages: list[str], fabric: list[str], stream: str | None
) -> None:
    plan = check_run.result.tracker.plans[host]
    assert plan["open_kernel_modules"] is True
    assert plan["packages"] == packages
    assert plan["fabric_packages"] == fabric
    assert plan["nvswitch"] is bool(fabric)
    assert plan["module_stream"] == stream
    services = ["nvidia-persistenced"] + (["nvidia-fabricmanager"] if fabric else [])
    assert plan["services"] == services


def test_fabric_manager_is_pinned_to_the_driver_version(check_run: CheckRun) -> None:
    (apt,) = check_run.messages("h100-hgx-ubuntu2204", "Report the packages a real run installs")[
        :1
    ]
    words = apt.split()
    assert "linux-headers-5.15.0-131-generic" in words  # headers of the running kernel
    for pkg in ("nvidia-headless-580-open", "nvidia-fabricmanager-580", "libnvidia-nscq-580"):
        assert f"{pkg}=580.95.05-*" in words
    assert apt.endswith("and holds them.")
    (dnf,) = check_run.messages("h100-hgx-rhel9", "Report the packages a real run installs")[:1]
    assert "module stream nvidia-driver:580-open" in dnf
    assert "nvidia-fabric-manager-580.95.05" in dnf.split()
    assert "kernel-devel-5.14.0-503.11.1.el9_5.x86_64" in dnf.split()
    assert dnf.endswith("and versionlocks them.")


def test_no_driver_on_a_host_without_gpus(check_run: CheckRun) -> None:
    assert "no-gpu-debian12" not in check_run.result.tracker.plans
    findings = check_run.findings("no-gpu-debian12")
    assert findings["gpus"]["detail"] == "no GPU (CPU-only host)"
    assert findings["model_store"]["detail"] == "/dev/vdb becomes XFS (536.9 GB)"


def test_preflight_sees_what_the_fixtures_show(check_run: CheckRun) -> None:
    h100 = check_run.findings("h100-hgx-ubuntu2204")
    assert h100["gpus"]["detail"] == "8 x NVIDIA H100 80GB HBM3"
    assert h100["driver"]["detail"] == "driver 550.90.07 loaded; nvidia_driver installs 580.95.05"
    assert h100["nvlink"]["detail"].startswith("4 NVSwitch chips")
    h200 = check_run.findings("h200-hgx-ubuntu2404")
    assert h200["secure_boot"]["status"] == "warn"
    assert h200["secure_boot"]["detail"].endswith("(accepted by preflight_accept)")
    nvl = check_run.findings("h200-nvl-debian12")
    assert nvl["nvlink"]["detail"].startswith("NVLink bridges join GPU0+GPU1; GPU2+GPU3")
    pcie = check_run.findings("h100-pcie-rhel9")
    assert pcie["gpus"]["detail"] == "2 x NVIDIA H100 PCIe"
    assert pcie["driver"]["detail"] == "no driver yet; nvidia_driver installs 580.95.05"
    assert pcie["os"]["detail"] == "RHEL 9"


def test_model_store_plans(check_run: CheckRun) -> None:
    (h100,) = check_run.messages("h100-hgx-ubuntu2204", "Show the model store plan")
    assert h100.startswith("8 disks (/dev/nvme2n1, ")
    assert "RAID0 /dev/md/appliance-models with XFS (30.7 TB)" in h100
    (h200,) = check_run.messages("h200-hgx-ubuntu2404", "Show the model store plan")
    # nvme2n1 holds an old XFS: left alone, the two empty disks become the store.
    assert h200.startswith("2 disks (/dev/nvme1n1, /dev/nvme3n1) become RAID0")


def test_container_runtime_follows_the_os(check_run: CheckRun) -> None:
    msgs = {
        host: " ".join(check_run.messages(host, "Report the packages a real run installs")[1:])
        for host in ("h100-hgx-ubuntu2204", "h100-hgx-rhel9")
    }
    assert "docker.io" in msgs["h100-hgx-ubuntu2204"].split()
    assert "nvidia-container-toolkit=1.17.8-*" in msgs["h100-hgx-ubuntu2204"].split()
    assert "podman" in msgs["h100-hgx-rhel9"].split()
    assert "nvidia-container-toolkit-1.17.8" in msgs["h100-hgx-rhel9"].split()


def _ran(check_run: CheckRun, task: str) -> set[str]:
    return {
        str(e["event_data"]["host"])
        for e in check_run.events
        if e.get("event") == "runner_on_ok" and e["event_data"].get("task") == task
    }


def test_monitoring_on_the_head_and_the_dcgm_exporter_on_gpu_hosts(check_run: CheckRun) -> None:
    head = "h100-hgx-ubuntu2204"
    assert _ran(check_run, "Install Prometheus") == {head}
    (grafana,) = check_run.messages(head, "Report the package a real run installs")
    assert "grafana=11.6.*" in grafana
    gpu_hosts = {name for name in HOSTS if not name.startswith("no-gpu")}
    assert _ran(check_run, "Install the DCGM exporter's service") == gpu_hosts


def test_run_directory_keeps_the_artifacts(check_run: CheckRun) -> None:
    summary = json.loads((check_run.result.run_dir / "summary.json").read_text())
    assert summary["status"] == "successful"
    assert os.path.isdir(check_run.result.run_dir / "artifacts" / "ansible" / "job_events")
