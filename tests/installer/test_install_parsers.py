"""The probe parsers on fixture outputs in the formats real hosts print (tests/fixtures/hosts).

The fixtures were written for these tests, byte for byte in the layout of nvidia-smi (R550,
R570), lspci -Dnn, lsblk --json (util-linux 2.37+) and mokutil; no GPU machine was at hand
to record them, so a new driver release is worth checking against a real host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.installer import parsers
from appliance.installer.parsers import ProbeFormatError

HOSTS = Path(__file__).resolve().parent.parent / "fixtures" / "hosts"


def fixture(host: str, name: str) -> str:
    return (HOSTS / host / name).read_text()


@pytest.mark.parametrize(
    ("host", "name", "memory", "driver", "persistence"),
    [
        ("h100-hgx", "NVIDIA H100 80GB HBM3", 81559, "550.90.07", True),
        ("h200-hgx", "NVIDIA H200", 143771, "570.124.06", False),
        ("h200-nvl", "NVIDIA H200 NVL", 143771, "570.124.06", True),
    ],
)
def test_smi_query(host: str, name: str, memory: int, driver: str, persistence: bool) -> None:
    gpus = parsers.parse_smi_query(fixture(host, "nvidia-smi-query.csv"))
    assert [g.index for g in gpus] == list(range(len(gpus)))
    assert {g.name for g in gpus} == {name}
    assert {g.memory_mib for g in gpus} == {memory}
    assert {g.driver_version for g in gpus} == {driver}
    assert {g.persistence_mode for g in gpus} == {persistence}
    assert gpus[0].bus_id == parsers.normal_bus_id(gpus[0].bus_id)  # lspci's spelling


def test_smi_query_bus_ids_match_lspci() -> None:
    gpus = parsers.parse_smi_query(fixture("h100-hgx", "nvidia-smi-query.csv"))
    pci = parsers.parse_lspci(fixture("h100-hgx", "lspci.txt"))
    assert [g.bus_id for g in gpus] == [d.address for d in pci if d.is_gpu]
    assert gpus[0].bus_id == "0000:1b:00.0"


def test_smi_query_rejects_another_layout() -> None:
    with pytest.raises(ProbeFormatError, match="unexpected header"):
        parsers.parse_smi_query("index, name\n0, NVIDIA H100 80GB HBM3\n")
    assert parsers.parse_smi_query("") == []


@pytest.mark.parametrize(
    ("host", "count", "driver", "cuda", "fabric"),
    [
        ("h100-hgx", 8, "550.90.07", "12.4", ("Completed", "Success")),
        ("h200-hgx", 8, "570.124.06", "12.8", ("Completed", "Success")),
        ("h200-nvl", 4, "570.124.06", "12.8", (None, None)),
    ],
)
def test_smi_q(
    host: str, count: int, driver: str, cuda: str, fabric: tuple[str | None, str | None]
) -> None:
    report = parsers.parse_smi_q(fixture(host, "nvidia-smi-q.txt"))
    assert (report.driver_version, report.cuda_version) == (driver, cuda)
    assert len(report.gpus) == count
    assert {(g.fabric_state, g.fabric_status) for g in report.gpus} == {fabric}
    assert {g.architecture for g in report.gpus} == {"Hopper"}
    assert {g.mig_mode for g in report.gpus} == {"Disabled"}
    query = parsers.parse_smi_query(fixture(host, "nvidia-smi-query.csv"))
    assert [g.bus_id for g in report.gpus] == [g.bus_id for g in query]
    assert [g.memory_mib for g in report.gpus] == [g.memory_mib for g in query]


def test_smi_q_fabric_still_coming_up() -> None:
    report = parsers.parse_smi_q(fixture("h200-hgx", "nvidia-smi-q-fabric-in-progress.txt"))
    assert {g.fabric_state for g in report.gpus} == {"In Progress"}


def test_smi_q_module_ids_on_the_baseboard() -> None:
    report = parsers.parse_smi_q(fixture("h100-hgx", "nvidia-smi-q.txt"))
    assert sorted(g.module_id or "" for g in report.gpus) == [str(i) for i in range(1, 9)]


def test_smi_q_rejects_other_text() -> None:
    with pytest.raises(ProbeFormatError, match="NVSMI LOG"):
        parsers.parse_smi_q("NVIDIA-SMI has failed because it couldn't communicate with the driver")


def test_topo_hgx_is_fully_nvlinked() -> None:
    topo = parsers.parse_topo(fixture("h100-hgx", "nvidia-smi-topo.txt"))
    assert topo.gpus == [f"GPU{i}" for i in range(8)]
    assert topo.fully_nvlinked
    assert topo.nvlinks("GPU0", "GPU7") == 18
    assert topo.nvlink_groups == [topo.gpus]
    assert topo.links["GPU0"]["NIC0"] == "PXB"
    assert topo.links["GPU0"]["NIC4"] == "SYS"
    assert topo.nics["NIC9"] == "mlx5_9"
    assert topo.cpu_affinity["GPU0"] == "0-55,112-167"
    assert topo.numa_affinity["GPU7"] == "1"


def test_topo_nvl_pairs() -> None:
    topo = parsers.parse_topo(fixture("h200-nvl", "nvidia-smi-topo.txt"))
    assert not topo.fully_nvlinked
    assert topo.nvlink_groups == [["GPU0", "GPU1"], ["GPU2", "GPU3"]]
    assert topo.nvlinks("GPU0", "GPU2") == 0
    assert topo.cpu_affinity["GPU3"] == "32-63,96-127"


def test_topo_header_without_escape_codes() -> None:
    text = parsers.strip_ansi(fixture("h200-nvl", "nvidia-smi-topo.txt"))
    assert parsers.parse_topo(text).nvlink_groups == [["GPU0", "GPU1"], ["GPU2", "GPU3"]]


def test_topo_rejects_other_text() -> None:
    with pytest.raises(ProbeFormatError, match="GPU0"):
        parsers.parse_topo("No devices were found\n")


@pytest.mark.parametrize(
    ("host", "gpus", "switches", "model"),
    [
        ("h100-hgx", 8, 4, "NVIDIA H100 80GB HBM3"),
        ("h200-hgx", 8, 4, "NVIDIA H200"),
        ("h200-nvl", 4, 0, "NVIDIA H200 NVL"),
        ("h100-pcie", 2, 0, "NVIDIA H100 PCIe"),
        ("no-gpu", 0, 0, None),
    ],
)
def test_lspci(host: str, gpus: int, switches: int, model: str | None) -> None:
    devices = parsers.parse_lspci(fixture(host, "lspci.txt"))
    assert sum(d.is_gpu for d in devices) == gpus
    assert sum(d.is_nvswitch for d in devices) == switches
    assert {d.model for d in devices if d.is_gpu} == ({model} if model else set())


def test_lspci_unknown_device_and_bad_line() -> None:
    line = "0000:3b:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2999] (rev a1)"
    (dev,) = parsers.parse_lspci(line)
    assert dev.is_gpu and dev.model == "NVIDIA device 10de:2999"
    with pytest.raises(ProbeFormatError, match="lspci"):
        parsers.parse_lspci("1b:00.0 3D controller: NVIDIA Corporation GH100")


def test_lsblk_h100_tree() -> None:
    disks = parsers.parse_lsblk(fixture("h100-hgx", "lsblk.json"))
    assert [d.name for d in disks] == [f"nvme{i}n1" for i in range(10)]
    os_disk = disks[0]
    assert [c.name for c in os_disk.children] == ["nvme0n1p1", "nvme0n1p2"]
    (md,) = os_disk.children[1].children
    assert (md.type, md.fstype, md.mountpoints) == ("raid1", "ext4", ["/"])
    data = disks[2]
    assert (data.transport, data.size, data.fstype, data.children) == (
        "nvme",
        3840755982336,
        None,
        [],
    )
    assert data.mountpoints == []
    assert not data.rotational


def test_lsblk_old_util_linux_spelling() -> None:
    old = (
        '{"blockdevices": [{"name": "sdb", "type": "disk", "size": "1000204886016", '
        '"rota": "1", "ro": "0", "rm": "0", "mountpoint": null, "fstype": null}]}'
    )
    (disk,) = parsers.parse_lsblk(old)
    assert (disk.path, disk.size, disk.rotational, disk.mountpoints) == (
        "/dev/sdb",
        1000204886016,
        True,
        [],
    )


def test_lsblk_rejects_other_text() -> None:
    with pytest.raises(ProbeFormatError, match="lsblk"):
        parsers.parse_lsblk("lsblk: unknown column: MOUNTPOINTS")


@pytest.mark.parametrize(
    ("host", "state"),
    [("h100-hgx", "disabled"), ("h200-hgx", "enabled"), ("no-gpu", "unsupported")],
)
def test_mokutil(host: str, state: str) -> None:
    assert parsers.parse_mokutil(fixture(host, "mokutil.txt")).state == state


def test_mokutil_setup_mode_and_missing() -> None:
    sb = parsers.parse_mokutil("SecureBoot disabled\nPlatform is in Setup Mode\n")
    assert (sb.state, sb.setup_mode) == ("disabled", True)
    assert parsers.parse_mokutil("").state == "unknown"


def test_ss_and_timedatectl() -> None:
    ss = (
        "LISTEN 0      4096         0.0.0.0:22         0.0.0.0:*\n"
        "LISTEN 0      511        127.0.0.1:6379       0.0.0.0:*\n"
        "LISTEN 0      4096            [::]:443           [::]:*\n"
        "LISTEN 0      128                *:8000             *:*\n"
    )
    assert parsers.parse_ss_listening(ss) == [22, 443, 6379, 8000]
    shown = "Timezone=UTC\nLocalRTC=no\nCanNTP=yes\nNTP=yes\nNTPSynchronized=yes\n"
    assert parsers.parse_timedatectl(shown) is True
    assert parsers.parse_timedatectl(shown.replace("=yes\n", "=no\n")) is False
    assert parsers.parse_timedatectl("") is None
