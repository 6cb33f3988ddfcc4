"""Parsers for what the preflight probes print on a host.

Each takes the text a command printed and returns plain data (dataclasses that turn into
dicts for Ansible). They are tested on fixture outputs in the exact formats real hosts print
(tests/fixtures/hosts/). Anything a parser does not understand raises ProbeFormatError naming
the command, so a new driver's output format is reported instead of misread.

    nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,vbios_version,memory.total,
               persistence_mode --format=csv
    nvidia-smi -q
    nvidia-smi topo -m
    lspci -Dnn -d 10de:
    lsblk --json --bytes --output NAME,PATH,TYPE,SIZE,MODEL,SERIAL,TRAN,ROTA,RO,RM,FSTYPE,
          LABEL,UUID,PTTYPE,MOUNTPOINTS
    mokutil --sb-state
    ss -H -ltn
    timedatectl show
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from appliance.gpus import find_pci_gpu

SMI_QUERY_FIELDS = (
    "index",
    "name",
    "pci.bus_id",
    "driver_version",
    "vbios_version",
    "memory.total",
    "persistence_mode",
)
LSBLK_COLUMNS = (
    "NAME,PATH,TYPE,SIZE,MODEL,SERIAL,TRAN,ROTA,RO,RM,FSTYPE,LABEL,UUID,PTTYPE,MOUNTPOINTS"
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ProbeFormatError(ValueError):
    """A probe printed something its parser does not understand."""

    def __init__(self, command: str, detail: str) -> None:
        super().__init__(f"cannot read the output of `{command}`: {detail}")
        self.command = command


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def normal_bus_id(bus_id: str) -> str:
    """One spelling for a PCI address: nvidia-smi's 00000000:1B:00.0 is lspci's 0000:1b:00.0."""
    parts = bus_id.strip().lower().split(":")
    if len(parts) != 3:
        raise ValueError(f"not a PCI address: {bus_id!r}")
    domain, bus, devfn = parts
    return f"{int(domain, 16):04x}:{bus}:{devfn}"


# --- nvidia-smi --query-gpu -------------------------------------------------------------------


@dataclass(frozen=True)
class SmiGpu:
    index: int
    name: str
    bus_id: str
    driver_version: str
    vbios_version: str
    memory_mib: int | None
    persistence_mode: bool | None


def _na(value: str) -> str | None:
    value = value.strip()
    return None if value in ("[N/A]", "N/A", "[Not Supported]", "") else value


def _mib(value: str | None) -> int | None:
    if value is None:
        return None
    number, _, unit = value.partition(" ")
    if unit not in ("MiB", ""):
        raise ValueError(f"unexpected memory unit in {value!r}")
    return int(number)


def parse_smi_query(text: str) -> list[SmiGpu]:
    """`nvidia-smi --query-gpu=<SMI_QUERY_FIELDS> --format=csv` (with its header line)."""
    command = "nvidia-smi --query-gpu"
    rows = [r for r in csv.reader(io.StringIO(text), skipinitialspace=True) if r]
    if not rows:
        return []
    header = [h.split(" [")[0].strip() for h in rows[0]]
    if header != list(SMI_QUERY_FIELDS):
        raise ProbeFormatError(command, f"unexpected header {rows[0]!r}")
    gpus = []
    for row in rows[1:]:
        if len(row) != len(header):
            raise ProbeFormatError(command, f"row with {len(row)} fields: {row!r}")
        cell = dict(zip(header, row, strict=True))
        persistence = _na(cell["persistence_mode"])
        try:
            gpus.append(
                SmiGpu(
                    index=int(cell["index"]),
                    name=cell["name"].strip(),
                    bus_id=normal_bus_id(cell["pci.bus_id"]),
                    driver_version=cell["driver_version"].strip(),
                    vbios_version=cell["vbios_version"].strip(),
                    memory_mib=_mib(_na(cell["memory.total"])),
                    persistence_mode=None if persistence is None else persistence == "Enabled",
                )
            )
        except ValueError as exc:
            raise ProbeFormatError(command, str(exc)) from None
    return gpus


# --- nvidia-smi -q ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SmiQueryGpu:
    bus_id: str
    name: str
    architecture: str | None
    persistence_mode: bool | None
    mig_mode: str | None
    module_id: str | None
    memory_mib: int | None
    fabric_state: str | None
    fabric_status: str | None


@dataclass(frozen=True)
class SmiReport:
    driver_version: str | None
    cuda_version: str | None
    gpus: list[SmiQueryGpu]


Tree = dict[str, Any]


def _smi_tree(lines: list[str]) -> Tree:
    """The indented `Key : Value` / `Section` layout of nvidia-smi -q as nested dicts."""
    root: Tree = {}
    stack: list[tuple[int, Tree]] = [(-1, root)]
    for raw in lines:
        if not raw.strip() or raw.startswith("="):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        key, sep, value = raw.strip().partition(" : ")
        if not sep and raw.rstrip().endswith(" :"):  # "Key :" with an empty value
            key, sep, value = raw.strip()[:-1], ":", ""
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if sep:
            parent[key.strip()] = value.strip()
        else:
            child: Tree = {}
            parent[key.strip()] = child
            stack.append((indent, child))
    return root


def _section(tree: Tree, key: str) -> Tree:
    value = tree.get(key)
    return value if isinstance(value, dict) else {}


def parse_smi_q(text: str) -> SmiReport:
    """`nvidia-smi -q`: driver and CUDA versions, and per GPU what the installer checks."""
    command = "nvidia-smi -q"
    if "==============NVSMI LOG==============" not in text:
        raise ProbeFormatError(command, "no NVSMI LOG header")
    blocks: list[tuple[str, list[str]]] = []
    header: list[str] = []
    for line in text.splitlines():
        match = re.match(r"^GPU ([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d)\s*$", line)
        if match:
            blocks.append((match.group(1), []))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            header.append(line)
    top = _smi_tree(header)
    gpus = []
    for bus_id, lines in blocks:
        tree = _smi_tree(lines)
        fabric, mig, fb = (_section(tree, k) for k in ("Fabric", "MIG Mode", "FB Memory Usage"))
        persistence = _na(str(tree.get("Persistence Mode", "")))
        try:
            memory = _mib(_na(str(fb.get("Total", ""))))
        except ValueError as exc:
            raise ProbeFormatError(command, str(exc)) from None
        gpus.append(
            SmiQueryGpu(
                bus_id=normal_bus_id(bus_id),
                name=str(tree.get("Product Name", "")),
                architecture=_na(str(tree.get("Product Architecture", ""))),
                persistence_mode=None if persistence is None else persistence == "Enabled",
                mig_mode=_na(str(mig.get("Current", ""))),
                module_id=_na(str(tree.get("Module ID", ""))),
                memory_mib=memory,
                fabric_state=_na(str(fabric.get("State", ""))),
                fabric_status=_na(str(fabric.get("Status", ""))),
            )
        )
    attached = top.get("Attached GPUs")
    if attached is not None and int(attached) != len(gpus):
        raise ProbeFormatError(command, f"{attached} GPUs attached but {len(gpus)} listed")
    return SmiReport(
        driver_version=_na(str(top.get("Driver Version", ""))),
        cuda_version=_na(str(top.get("CUDA Version", ""))),
        gpus=gpus,
    )


# --- nvidia-smi topo -m -----------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    gpus: list[str]
    nics: dict[str, str]  # NIC0 -> mlx5_0
    links: dict[str, dict[str, str]]  # GPU0 -> {GPU1: NV18, NIC0: PXB, ...}
    cpu_affinity: dict[str, str]
    numa_affinity: dict[str, str]

    def nvlinks(self, a: str, b: str) -> int:
        """How many bonded NVLinks join two GPUs (0: they talk over PCIe)."""
        link = self.links.get(a, {}).get(b, "")
        return int(link[2:]) if re.fullmatch(r"NV\d+", link) else 0

    @property
    def fully_nvlinked(self) -> bool:
        """Every pair of GPUs on NVLink: what an NVSwitch baseboard (HGX) looks like."""
        pairs = [(a, b) for i, a in enumerate(self.gpus) for b in self.gpus[i + 1 :]]
        return bool(pairs) and all(self.nvlinks(a, b) > 0 for a, b in pairs)

    @property
    def nvlink_groups(self) -> list[list[str]]:
        """GPUs joined by NVLink, directly or through each other (the tensor-parallel domains)."""
        seen: set[str] = set()
        groups = []
        for gpu in self.gpus:
            if gpu in seen:
                continue
            group, todo = [], [gpu]
            while todo:
                g = todo.pop()
                if g in seen:
                    continue
                seen.add(g)
                group.append(g)
                todo += [o for o in self.gpus if o not in seen and self.nvlinks(g, o) > 0]
            groups.append(sorted(group, key=lambda n: int(n[3:])))
        return groups


_AFFINITY_COLUMNS = ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")


def parse_topo(text: str) -> Topology:
    """`nvidia-smi topo -m`: the link matrix, CPU and NUMA affinity, and the NIC legend."""
    command = "nvidia-smi topo -m"
    lines = strip_ansi(text).splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.startswith("\tGPU0")), None)
    if header_at is None:
        raise ProbeFormatError(command, "no header row starting with GPU0")
    header = [c.strip() for c in lines[header_at].split("\t") if c.strip()]
    devices = [c for c in header if c not in _AFFINITY_COLUMNS]
    extra = [c for c in header if c in _AFFINITY_COLUMNS]
    links: dict[str, dict[str, str]] = {}
    cpu: dict[str, str] = {}
    numa: dict[str, str] = {}
    for line in lines[header_at + 1 :]:
        if not line.strip():
            break
        cells = [c.strip() for c in line.split("\t")]
        row, rest = cells[0], cells[1:]
        if len(rest) < len(devices):
            raise ProbeFormatError(command, f"short row for {row}: {line!r}")
        links[row] = dict(zip(devices, rest[: len(devices)], strict=True))
        tail = dict(zip(extra, [c for c in rest[len(devices) :] if c], strict=False))
        if row.startswith("GPU"):
            cpu[row] = tail.get("CPU Affinity", "N/A")
            numa[row] = tail.get("NUMA Affinity", "N/A")
    nics = dict(re.findall(r"^\s*(NIC\d+): (\S+)\s*$", "\n".join(lines), flags=re.M))
    gpus = [d for d in devices if d.startswith("GPU")]
    return Topology(gpus=gpus, nics=nics, links=links, cpu_affinity=cpu, numa_affinity=numa)


# --- lspci ------------------------------------------------------------------------------------

# NVSwitch chips, by PCI device id (the pci.ids names change between distributions).
NVSWITCH_DEVICE_IDS = {"1ac0": "V100 NVSwitch", "1af1": "A100 NVSwitch", "22a3": "H100 NVSwitch"}
_LSPCI = re.compile(
    r"^(?P<address>[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d) (?P<class_name>.+?) "
    r"\[(?P<class_code>[0-9a-f]{4})\]: (?P<description>.*?) "
    r"\[(?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4})\](?: \(rev (?P<rev>[0-9a-f]+)\))?$"
)


@dataclass(frozen=True)
class PciDevice:
    address: str
    class_code: str
    vendor: str
    device: str
    description: str

    @property
    def is_gpu(self) -> bool:
        # 0300 VGA, 0302 3D controller: datacenter GPUs are 3D controllers.
        return self.vendor == "10de" and self.class_code in ("0300", "0302")

    @property
    def is_nvswitch(self) -> bool:
        return self.vendor == "10de" and self.device in NVSWITCH_DEVICE_IDS

    @property
    def model(self) -> str:
        if self.is_nvswitch:
            return NVSWITCH_DEVICE_IDS[self.device]
        # Named as nvidia-smi will name it once the driver is in (appliance.gpus, the one
        # GPU table): a host reads the same before and after nvidia_driver.
        spec = find_pci_gpu(self.device) if self.vendor == "10de" else None
        return spec.smi_names[0] if spec else f"NVIDIA device {self.vendor}:{self.device}"


def parse_lspci(text: str) -> list[PciDevice]:
    """`lspci -Dnn` (any filter): one device per line."""
    devices = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LSPCI.match(line.strip())
        if match is None:
            raise ProbeFormatError("lspci -Dnn", f"unexpected line {line!r}")
        devices.append(
            PciDevice(
                address=match["address"],
                class_code=match["class_code"],
                vendor=match["vendor"],
                device=match["device"],
                description=match["description"],
            )
        )
    return devices


# --- lsblk --json -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    name: str
    path: str
    type: str  # disk, part, raid0, raid1, loop, lvm, crypt, rom
    size: int
    model: str | None
    serial: str | None
    transport: str | None  # nvme, sata, usb, ...
    rotational: bool
    read_only: bool
    removable: bool
    fstype: str | None  # ext4, xfs, linux_raid_member, LVM2_member, swap, ...
    label: str | None
    uuid: str | None
    pttype: str | None
    mountpoints: list[str]
    children: list[BlockDevice] = field(default_factory=list)

    def walk(self) -> list[BlockDevice]:
        """This device and everything built on it."""
        found = [self]
        for child in self.children:
            found += child.walk()
        return found


def _flag(value: Any) -> bool:
    # util-linux >= 2.33 prints booleans; older versions print "0"/"1".
    if isinstance(value, bool):
        return value
    return str(value).strip() in ("1", "true")


def _block(data: dict[str, Any]) -> BlockDevice:
    mounts = data.get("mountpoints")
    if mounts is None:  # util-linux < 2.37 has only MOUNTPOINT
        mounts = [data.get("mountpoint")]
    size = data.get("size")
    return BlockDevice(
        name=str(data["name"]),
        path=str(data.get("path") or f"/dev/{data['name']}"),
        type=str(data["type"]),
        size=int(size) if size is not None else 0,
        model=(data.get("model") or "").strip() or None,
        serial=(data.get("serial") or "").strip() or None,
        transport=data.get("tran"),
        rotational=_flag(data.get("rota", False)),
        read_only=_flag(data.get("ro", False)),
        removable=_flag(data.get("rm", False)),
        fstype=data.get("fstype"),
        label=data.get("label"),
        uuid=data.get("uuid"),
        pttype=data.get("pttype"),
        mountpoints=[m for m in mounts if m],
        children=[_block(c) for c in data.get("children", [])],
    )


def parse_lsblk(text: str) -> list[BlockDevice]:
    """`lsblk --json --bytes --output <LSBLK_COLUMNS>`: top-level devices with their children."""
    command = "lsblk --json"
    try:
        data = json.loads(text)
        return [_block(d) for d in data["blockdevices"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProbeFormatError(command, str(exc)) from None


# --- mokutil, ss, timedatectl -----------------------------------------------------------------


@dataclass(frozen=True)
class SecureBoot:
    state: str  # enabled, disabled, unsupported (legacy BIOS boot), unknown (no mokutil)
    setup_mode: bool = False


def parse_mokutil(text: str) -> SecureBoot:
    """`mokutil --sb-state`, stdout and stderr together."""
    text = text.strip()
    setup = "Setup Mode" in text
    if "SecureBoot enabled" in text:
        return SecureBoot("enabled", setup)
    if "SecureBoot disabled" in text:
        return SecureBoot("disabled", setup)
    if "EFI variables are not supported" in text:
        return SecureBoot("unsupported")
    return SecureBoot("unknown")


def parse_ss_listening(text: str) -> list[int]:
    """`ss -H -ltn`: the TCP ports something listens on."""
    ports: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local = fields[3]
        port = local.rsplit(":", 1)[-1]
        if port.isdigit():
            ports.add(int(port))
    return sorted(ports)


def parse_timedatectl(text: str) -> bool | None:
    """`timedatectl show`: is the clock synchronized (None: cannot tell)."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    sync = values.get("NTPSynchronized")
    return None if sync is None else sync == "yes"
