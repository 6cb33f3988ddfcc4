"""What a host's probes mean, and the checks `appliance doctor` and the preflight role report.

The preflight role runs the probes (check-mode safe, they change nothing) and hands their raw
output to `host_facts`; `findings` turns the facts into checks. A failing check says what to
fix, and each can be accepted by name with ``preflight_accept: [<check>]`` when the admin
knows better (it is then reported as a warning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.installer import parsers, storage

SUPPORTED_OS = {
    ("Ubuntu", "22"): "Ubuntu 22.04",
    ("Ubuntu", "24"): "Ubuntu 24.04",
    ("Debian", "12"): "Debian 12",
    ("RedHat", "9"): "RHEL 9",
    ("Rocky", "9"): "Rocky Linux 9",
    ("AlmaLinux", "9"): "AlmaLinux 9",
}
CHECKS = (
    "os",
    "gpus",
    "driver",
    "nvlink",
    "model_store",
    "secure_boot",
    "kernel_headers",
    "ports",
    "time_sync",
)


@dataclass
class Finding:
    check: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""


@dataclass
class HostFacts:
    os: str
    os_supported: bool
    gpus: list[dict[str, Any]] = field(default_factory=list)
    gpu_models: list[str] = field(default_factory=list)
    nvswitches: int = 0
    driver_version: str | None = None
    driver_state: str = "absent"  # absent, loaded, not_loaded
    fully_nvlinked: bool | None = None
    nvlink_groups: list[list[str]] = field(default_factory=list)
    secure_boot: str = "unknown"
    lspci_missing: bool = False
    kernel: str = ""
    kernel_headers: bool = False
    listening: list[int] = field(default_factory=list)
    time_synced: bool | None = None
    store: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # probe outputs that could not be read

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_count": self.gpu_count, "nvswitch": self.nvswitches > 0}


MISSING = 127  # the shell's "command not found"


def _rc(result: dict[str, Any]) -> int:
    """A probe's exit status; MISSING when it did not run or its command does not exist."""
    if result.get("skipped") or "rc" not in result:
        return MISSING
    # Ansible's command module reports a missing executable as rc 2 with this message.
    if "No such file or directory" in str(result.get("msg", "")) and not result.get("stdout"):
        return MISSING
    return int(result["rc"])


def _out(probe: dict[str, Any], key: str) -> tuple[int, str]:
    """(rc, stdout and stderr) of one probe."""
    result = probe.get(key) or {}
    text = (result.get("stdout") or "") + "\n" + (result.get("stderr") or "")
    return _rc(result), text.strip("\n")


def _stdout(probe: dict[str, Any], key: str) -> tuple[int, str]:
    result = probe.get(key) or {}
    return _rc(result), result.get("stdout") or ""


def host_facts(probe: dict[str, Any], store_settings: dict[str, Any] | None = None) -> HostFacts:
    """Parse every probe of one host. A probe that cannot be read is noted, never fatal."""
    os_info = probe.get("os") or {}
    distribution = str(os_info.get("distribution", ""))
    major = str(os_info.get("major", ""))
    name = SUPPORTED_OS.get((distribution, major))
    facts = HostFacts(
        os=name or f"{distribution} {os_info.get('version', '')}".strip(),
        os_supported=name is not None,
        kernel=str(probe.get("kernel", "")),
        kernel_headers=bool(probe.get("kernel_headers", False)),
    )

    def read(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except parsers.ProbeFormatError as exc:
            facts.errors.append(str(exc))
        except ValueError as exc:
            facts.errors.append(f"{what}: {exc}")
        return None

    rc, text = _stdout(probe, "lspci")
    facts.lspci_missing = rc == MISSING
    pci = (read("lspci", parsers.parse_lspci, text) or []) if rc == 0 else []
    smi_gpus: dict[str, parsers.SmiGpu] = {}
    rc, text = _out(probe, "smi_query")
    if rc == 0:
        for gpu in (
            read("nvidia-smi", parsers.parse_smi_query, _stdout(probe, "smi_query")[1]) or []
        ):
            smi_gpus[gpu.bus_id] = gpu
        if smi_gpus:
            facts.driver_version = next(iter(smi_gpus.values())).driver_version
        facts.driver_state = "loaded"
    elif rc != MISSING and "couldn't communicate with the NVIDIA driver" in text:
        facts.driver_state = "not_loaded"
    for dev in pci:
        if dev.is_nvswitch:
            facts.nvswitches += 1
        elif dev.is_gpu:
            smi = smi_gpus.get(dev.address)
            facts.gpus.append(
                {
                    "bus_id": dev.address,
                    "device_id": dev.device,
                    "model": dev.model,
                    "name": smi.name if smi else None,
                    "memory_mib": smi.memory_mib if smi else None,
                    "persistence_mode": smi.persistence_mode if smi else None,
                }
            )
    facts.gpu_models = sorted({g["name"] or g["model"] for g in facts.gpus})

    rc, text = _stdout(probe, "smi_topo")
    if rc == 0 and text.strip():
        topo = read("nvidia-smi topo -m", parsers.parse_topo, text)
        if topo is not None:
            facts.fully_nvlinked = topo.fully_nvlinked
            facts.nvlink_groups = topo.nvlink_groups

    rc, text = _out(probe, "mokutil")
    if rc != MISSING:
        facts.secure_boot = parsers.parse_mokutil(text).state

    rc, text = _stdout(probe, "ss")
    if rc == 0:
        facts.listening = parsers.parse_ss_listening(text)

    rc, text = _stdout(probe, "timedatectl")
    if rc == 0:
        facts.time_synced = parsers.parse_timedatectl(text)

    rc, text = _stdout(probe, "lsblk")
    disks = (read("lsblk", parsers.parse_lsblk, text) or []) if rc == 0 else []
    settings = store_settings or {}
    plan = storage.plan_store(
        disks,
        list(settings.get("devices") or []),
        force=bool(settings.get("force", False)),
        mount=str(settings.get("mount", "/srv/appliance/models")),
        label=str(settings.get("label", storage.DEFAULT_LABEL)),
        md_name=str(settings.get("md_name", storage.DEFAULT_MD_NAME)),
    )
    facts.store = {**asdict(plan), "description": plan.describe()}
    return facts


def findings(facts: HostFacts, settings: dict[str, Any]) -> list[Finding]:
    """The checks for one host. `settings` come from the preflight role's variables."""
    out: list[Finding] = []
    add = out.append
    require_gpus = bool(settings.get("require_gpus", True))
    expected = settings.get("expected_gpu_count")
    gpu_host = facts.gpu_count > 0

    if facts.os_supported:
        add(Finding("os", "ok", facts.os))
    else:
        add(
            Finding(
                "os",
                "fail",
                f"{facts.os or 'unknown OS'} is not a supported OS",
                "Install Ubuntu 22.04/24.04, Debian 12 or RHEL 9 (or Rocky/Alma 9)",
            )
        )

    if not gpu_host and require_gpus and facts.lspci_missing:
        add(
            Finding(
                "gpus",
                "fail",
                "cannot look for GPUs: lspci is not installed",
                "Install pciutils (apt-get install pciutils / dnf install pciutils)",
            )
        )
    elif not gpu_host:
        if require_gpus:
            add(
                Finding(
                    "gpus",
                    "fail",
                    "lspci shows no NVIDIA GPU",
                    "Check that the GPUs are seated and enabled in the firmware setup; for a "
                    "CPU-only host set preflight_require_gpus: false",
                )
            )
        else:
            add(Finding("gpus", "ok", "no GPU (CPU-only host)"))
    elif expected is not None and int(expected) != facts.gpu_count:
        add(
            Finding(
                "gpus",
                "fail",
                f"{facts.gpu_count} GPUs found, {expected} expected",
                "Reseat or replace the missing GPU (compare `lspci -d 10de:` with the "
                "baseboard's slots), or set preflight_expected_gpu_count to the count present",
            )
        )
    elif len(facts.gpu_models) > 1:
        add(
            Finding(
                "gpus",
                "warn",
                f"{facts.gpu_count} GPUs of mixed models: {', '.join(facts.gpu_models)}",
            )
        )
    else:
        add(Finding("gpus", "ok", f"{facts.gpu_count} x {facts.gpu_models[0]}"))

    target = settings.get("driver_version")
    if not gpu_host:
        add(Finding("driver", "ok", "not needed without GPUs"))
    elif facts.driver_state == "loaded":
        detail = f"driver {facts.driver_version} loaded"
        if target and facts.driver_version != target:
            detail += f"; nvidia_driver installs {target}"
        add(Finding("driver", "ok", detail))
    elif facts.driver_state == "not_loaded":
        add(
            Finding(
                "driver",
                "warn",
                "an NVIDIA driver is installed but not loaded (reboot pending, nouveau "
                "loaded, or an unsigned module under Secure Boot)",
                "nvidia_driver reinstalls it and reboots; see `dmesg | grep -i nvidia` if it "
                "stays unloaded",
            )
        )
    else:
        add(Finding("driver", "ok", f"no driver yet; nvidia_driver installs {target or 'it'}"))

    if not gpu_host:
        add(Finding("nvlink", "ok", "no GPUs"))
    elif facts.nvswitches:
        add(
            Finding(
                "nvlink",
                "ok",
                f"{facts.nvswitches} NVSwitch chips: fabric manager and NSCQ will be installed",
            )
        )
    elif facts.gpu_count >= 8 and facts.fully_nvlinked:
        add(
            Finding(
                "nvlink",
                "warn",
                "all GPUs are NVLinked but lspci shows no NVSwitch by a known device id",
                "Set nvidia_driver_nvswitch: true if this is an NVSwitch baseboard (HGX), so "
                "fabric manager is installed",
            )
        )
    else:
        groups = [g for g in facts.nvlink_groups if len(g) > 1]
        detail = (
            "NVLink bridges join " + "; ".join("+".join(g) for g in groups)
            if groups
            else "no NVLink between GPUs (PCIe only)"
        )
        add(Finding("nvlink", "ok", f"{detail}; no NVSwitch, no fabric manager needed"))

    store = facts.store
    if not settings.get("model_store_enabled", True):
        add(Finding("model_store", "ok", "model store disabled (model_store_enabled: false)"))
    elif store.get("problems"):
        add(
            Finding(
                "model_store",
                "fail",
                "; ".join(store["problems"]),
                "Name whole, empty disks in model_store_devices, or set "
                "model_store_enabled: false on hosts without a model store",
            )
        )
    else:
        detail = str(store.get("description", ""))
        if store.get("skipped"):
            detail += "; left alone: " + "; ".join(store["skipped"])
        add(Finding("model_store", "ok", detail))

    if gpu_host and facts.secure_boot == "enabled":
        add(
            Finding(
                "secure_boot",
                "fail",
                "Secure Boot is on: DKMS-built NVIDIA modules load only if signed with an "
                "enrolled key",
                "Turn Secure Boot off in the firmware setup, or enroll the DKMS key "
                "(mokutil --import /var/lib/dkms/mok.pub, confirm at the next boot) and set "
                "preflight_accept: [secure_boot]",
            )
        )
    else:
        add(Finding("secure_boot", "ok", facts.secure_boot))

    if not gpu_host or facts.kernel_headers:
        add(Finding("kernel_headers", "ok", f"kernel {facts.kernel}"))
    else:
        add(
            Finding(
                "kernel_headers",
                "warn",
                f"no headers for kernel {facts.kernel}; nvidia_driver installs them",
                "If the package manager has no headers for this kernel, boot the newest "
                "kernel first",
            )
        )

    ports = [int(p) for p in settings.get("ports", [])]
    # Ports the appliance running on the host holds itself (doctor --local finds them).
    own = sorted(
        set(ports) & set(facts.listening) & {int(p) for p in settings.get("own_ports") or []}
    )
    busy = sorted(set(ports) & set(facts.listening) - set(own))
    if busy and not settings.get("appliance_installed", False):
        add(
            Finding(
                "ports",
                "fail",
                f"port(s) {', '.join(map(str, busy))} already in use by another service",
                "Stop the service that listens there (`ss -ltnp`); the gateway's port is "
                "install.gateway_port, Ray's are the ray_cluster_*_port variables",
            )
        )
    else:
        free = [p for p in ports if p not in own]
        detail = f"{', '.join(map(str, free)) or 'none'} available"
        if own:
            detail += f"; {', '.join(map(str, own))} held by the appliance running here"
        add(Finding("ports", "ok", detail))

    if facts.time_synced is True:
        add(Finding("time_sync", "ok", "clock synchronized"))
    elif facts.time_synced is False:
        add(
            Finding(
                "time_sync",
                "fail",
                "the clock is not synchronized (NTP)",
                "Enable chrony or systemd-timesyncd (`timedatectl set-ntp true`); certificates "
                "and Ray need agreeing clocks",
            )
        )
    else:
        add(Finding("time_sync", "warn", "cannot tell whether the clock is synchronized"))

    for error in facts.errors:
        add(Finding("probes", "warn", error, "Report this output format to the appliance team"))

    accepted = set(settings.get("accept") or [])
    for f in out:
        if f.status == "fail" and f.check in accepted:
            f.status = "warn"
            f.detail += " (accepted by preflight_accept)"
    return out


def failure_message(host: str, items: list[Finding]) -> str:
    """One message for every failed check of a host: what is wrong, what to do."""
    failed = [f for f in items if f.status == "fail"]
    lines = [f"preflight failed on {host}:"]
    for f in failed:
        lines.append(f"- {f.check}: {f.detail}. Fix: {f.fix}")
    lines.append(
        "Each check can be accepted with preflight_accept: [<check>] when you know better."
    )
    return "\n".join(lines)
