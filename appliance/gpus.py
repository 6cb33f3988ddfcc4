"""The GPU types the planner knows: memory, bandwidth, peak throughput, NVLink and precisions.

Figures are the vendor's datasheet numbers, each cited next to it. NVIDIA quotes Tensor Core
throughput "with sparsity"; the planner uses dense throughput, which is half of that figure.
``memory_mib`` is what ``nvidia-smi --query-gpu=memory.total`` reports on that GPU (what the
engines can allocate from), not the marketing capacity.

Precisions are the weight formats the engines (vLLM, TensorRT-LLM) run on that GPU, and
``compute`` says which Tensor Core rate the matrix multiplications of a precision run at:
weight-only formats (INT4 AWQ/GPTQ, MXFP4 before Blackwell) dequantize to BF16 and multiply
in BF16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Order of preference: quality first (bf16 > fp8 > 4-bit floats > 4-bit integers).
PRECISION_ORDER = ("bf16", "fp8", "nvfp4", "mxfp4", "int4-awq", "int4-gptq")

# PCIe Gen4 x16 moves 32 GB/s each way, Gen5 x16 64 GB/s (PCI-SIG); TP traffic that leaves
# NVLink goes at this rate.
PCIE4_GBS = 32.0
PCIE5_GBS = 64.0


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type. Bandwidth in TB/s, throughput in dense TFLOPS, links in GB/s one way."""

    key: str
    description: str
    memory_gb: int  # the datasheet capacity, decimal GB
    memory_mib: int  # nvidia-smi memory.total
    bandwidth_tbs: float
    tflops: dict[str, float]  # "bf16" / "fp8" / "fp4" -> dense TFLOPS
    nvlink_domain: int  # GPUs joined by NVLink (NVSwitch: the whole board); 1: PCIe only
    link_gbs: float  # GPU-to-GPU bandwidth inside the NVLink domain, one direction
    pcie_gbs: float
    precisions: tuple[str, ...]
    smi_names: tuple[str, ...]  # nvidia-smi --query-gpu=name
    aliases: tuple[str, ...] = field(default=())
    # PCI device ids (vendor 10de), as `lspci -nn` shows them: how the installer knows the GPU
    # before a driver is there to ask nvidia-smi. From the PCI ID Repository (pci-ids.ucw.cz).
    pci_ids: tuple[str, ...] = field(default=())

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def compute_tflops(self, precision: str) -> float:
        """Dense Tensor Core rate the GEMMs of `precision` run at on this GPU."""
        bf16 = self.tflops["bf16"]
        if precision == "nvfp4":
            return self.tflops.get("fp4", bf16)
        if precision == "fp8":
            return self.tflops.get("fp8", bf16)
        if precision == "mxfp4" and "fp4" in self.tflops:
            # Blackwell runs MXFP4 experts with FP8 activations (MXFP4 x MXFP8 MoE kernels).
            return self.tflops["fp8"]
        return bf16


_HOPPER_PRECISIONS = ("bf16", "fp8", "mxfp4", "int4-awq", "int4-gptq")

GPUS: dict[str, GpuSpec] = {
    spec.key: spec
    for spec in (
        GpuSpec(
            key="H100-80GB",
            description="NVIDIA H100 SXM5 80GB (HGX H100)",
            # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100),
            # SXM column: 80 GB HBM3, 3.35 TB/s; BF16 1,979 and FP8 3,958 TFLOPS with sparsity.
            memory_gb=80,
            memory_mib=81559,
            bandwidth_tbs=3.35,
            tflops={"bf16": 989.5, "fp8": 1979.0},
            # HGX H100: 8 GPUs on NVSwitch, NVLink 900 GB/s per GPU (450 GB/s each way).
            nvlink_domain=8,
            link_gbs=450.0,
            pcie_gbs=PCIE5_GBS,
            precisions=_HOPPER_PRECISIONS,
            smi_names=("NVIDIA H100 80GB HBM3",),
            aliases=("H100", "H100-SXM", "H100-SXM-80GB", "H100-SXM5-80GB"),
            pci_ids=("2330",),
        ),
        GpuSpec(
            key="H100-NVL",
            description="NVIDIA H100 NVL 94GB (PCIe card, NVLink bridge in pairs)",
            # Same datasheet, H100 NVL column: 94 GB HBM3, 3.9 TB/s; BF16 1,671 and FP8 3,341
            # TFLOPS with sparsity; NVLink bridge 600 GB/s between the two cards of a pair.
            memory_gb=94,
            memory_mib=95830,
            bandwidth_tbs=3.9,
            tflops={"bf16": 835.5, "fp8": 1670.5},
            nvlink_domain=2,
            link_gbs=300.0,
            pcie_gbs=PCIE5_GBS,
            precisions=_HOPPER_PRECISIONS,
            smi_names=("NVIDIA H100 NVL",),
            aliases=("H100-NVL-94GB", "H100-94GB"),
            pci_ids=("2321",),
        ),
        GpuSpec(
            key="H200",
            description="NVIDIA H200 SXM 141GB (HGX H200)",
            # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200), SXM column: 141 GB
            # HBM3e, 4.8 TB/s; BF16 1,979 and FP8 3,958 TFLOPS with sparsity; NVLink 900 GB/s.
            memory_gb=141,
            memory_mib=143771,
            bandwidth_tbs=4.8,
            tflops={"bf16": 989.5, "fp8": 1979.0},
            nvlink_domain=8,
            link_gbs=450.0,
            pcie_gbs=PCIE5_GBS,
            precisions=_HOPPER_PRECISIONS,
            smi_names=("NVIDIA H200",),
            aliases=("H200-141GB", "H200-SXM", "H200-SXM-141GB"),
            pci_ids=("2335",),
        ),
        GpuSpec(
            key="H100-PCIe",
            description="NVIDIA H100 PCIe 80GB (PCIe card, NVLink bridge in pairs)",
            # H100 datasheet, PCIe column: 80 GB HBM2e, 2 TB/s; BF16 1,513 and FP8 3,026
            # TFLOPS with sparsity; NVLink bridge 600 GB/s between two cards; PCIe Gen5 x16.
            memory_gb=80,
            memory_mib=81559,
            bandwidth_tbs=2.0,
            tflops={"bf16": 756.5, "fp8": 1513.0},
            nvlink_domain=2,
            link_gbs=300.0,
            pcie_gbs=PCIE5_GBS,
            precisions=_HOPPER_PRECISIONS,
            smi_names=("NVIDIA H100 PCIe",),
            aliases=("H100-PCIe-80GB",),
            pci_ids=("2331",),
        ),
        GpuSpec(
            key="H200-NVL",
            description="NVIDIA H200 NVL 141GB (PCIe card, NVLink bridge of 2 or 4)",
            # H200 datasheet, NVL column: 141 GB HBM3e, 4.8 TB/s; BF16 1,671 and FP8 3,341
            # TFLOPS with sparsity; 2- or 4-way NVLink bridge, 900 GB/s per GPU; PCIe Gen5.
            # The planner counts a 2-way pairing, the bridge every H200 NVL server has.
            memory_gb=141,
            memory_mib=143771,
            bandwidth_tbs=4.8,
            tflops={"bf16": 835.5, "fp8": 1670.5},
            nvlink_domain=2,
            link_gbs=450.0,
            pcie_gbs=PCIE5_GBS,
            precisions=_HOPPER_PRECISIONS,
            smi_names=("NVIDIA H200 NVL",),
            aliases=("H200-NVL-141GB",),
            pci_ids=("233b",),
        ),
        GpuSpec(
            key="A100-80GB",
            description="NVIDIA A100 SXM4 80GB (HGX A100)",
            # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM
            # 80GB column: HBM2e 2,039 GB/s; BF16 312 TFLOPS dense (624 with sparsity); no
            # FP8; NVLink 600 GB/s per GPU on the 8-GPU NVSwitch board.
            memory_gb=80,
            memory_mib=81920,
            bandwidth_tbs=2.039,
            tflops={"bf16": 312.0},
            nvlink_domain=8,
            link_gbs=300.0,
            pcie_gbs=PCIE4_GBS,
            # No FP8 Tensor Cores. vLLM runs MXFP4 (gpt-oss) on Ampere with Marlin kernels
            # (vllm-project/recipes OpenAI/GPT-OSS.md, "A100"); AWQ/GPTQ via Marlin on SM80+.
            precisions=("bf16", "mxfp4", "int4-awq", "int4-gptq"),
            smi_names=("NVIDIA A100-SXM4-80GB",),
            aliases=("A100", "A100-SXM", "A100-SXM4-80GB"),
            pci_ids=("20b2",),
        ),
        GpuSpec(
            key="A100-PCIe-80GB",
            description="NVIDIA A100 PCIe 80GB (PCIe card, NVLink bridge in pairs)",
            # A100 datasheet, PCIe 80GB column: HBM2e 1,935 GB/s; BF16 312 TFLOPS dense; NVLink
            # bridge 600 GB/s for two cards; PCIe Gen4 x16.
            memory_gb=80,
            memory_mib=81920,
            bandwidth_tbs=1.935,
            tflops={"bf16": 312.0},
            nvlink_domain=2,
            link_gbs=300.0,
            pcie_gbs=PCIE4_GBS,
            precisions=("bf16", "mxfp4", "int4-awq", "int4-gptq"),
            smi_names=("NVIDIA A100 80GB PCIe",),
            aliases=("A100-PCIe",),
            pci_ids=("20b5",),
        ),
        GpuSpec(
            key="L40S",
            description="NVIDIA L40S 48GB (PCIe, no NVLink)",
            # NVIDIA L40S datasheet (resources.nvidia.com/en-us-l40s/l40s-datasheet): 48 GB
            # GDDR6, 864 GB/s; BF16 733 and FP8 1,466 TFLOPS with sparsity (362.05 / 733
            # dense); PCIe Gen4 x16, 64 GB/s bidirectional; no NVLink.
            memory_gb=48,
            memory_mib=46068,
            bandwidth_tbs=0.864,
            tflops={"bf16": 362.05, "fp8": 733.0},
            nvlink_domain=1,
            link_gbs=PCIE4_GBS,
            pcie_gbs=PCIE4_GBS,
            # Ada (SM 8.9) has FP8 Tensor Cores. INT4 runs through Marlin (SM80+); MXFP4 is
            # assumed to as well, as vLLM does on A100 (its GPT-OSS recipe lists Ada as work
            # in progress).
            precisions=_HOPPER_PRECISIONS,
            smi_names=("NVIDIA L40S",),
            aliases=("L40S-48GB",),
            pci_ids=("26b9",),
        ),
        GpuSpec(
            key="B200",
            description="NVIDIA B200 180GB (HGX B200)",
            # NVIDIA HGX B200 specifications (nvidia.com/en-us/data-center/hgx), per GPU:
            # 180 GB HBM3e, 7.7 TB/s; FP4 18, FP8 9, BF16 4.5 PFLOPS with sparsity; NVLink 5
            # 1.8 TB/s per GPU, 8 GPUs on NVSwitch. nvidia-smi reports 183359 MiB.
            memory_gb=180,
            memory_mib=183359,
            bandwidth_tbs=7.7,
            tflops={"bf16": 2250.0, "fp8": 4500.0, "fp4": 9000.0},
            nvlink_domain=8,
            link_gbs=900.0,
            pcie_gbs=PCIE5_GBS,
            precisions=("bf16", "fp8", "nvfp4", "mxfp4", "int4-awq", "int4-gptq"),
            smi_names=("NVIDIA B200",),
            aliases=("B200-180GB", "B200-SXM"),
            pci_ids=("2901",),
        ),
    )
}


def _normal(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_LOOKUP: dict[str, GpuSpec] = {}
for _spec in GPUS.values():
    for _name in (_spec.key, *_spec.aliases, *_spec.smi_names):
        _LOOKUP[_normal(_name)] = _spec


_BY_PCI_ID: dict[str, GpuSpec] = {i: spec for spec in GPUS.values() for i in spec.pci_ids}


def find_gpu(name: str) -> GpuSpec | None:
    """The GPU type a key, alias or nvidia-smi name means (any case, '-' and ' ' ignored)."""
    return _LOOKUP.get(_normal(name))


def known_gpus() -> str:
    """The catalog's keys for messages: 'H100-80GB, H100-NVL, ...'."""
    return ", ".join(GPUS)


def find_pci_gpu(device_id: str) -> GpuSpec | None:
    """The GPU type of an NVIDIA PCI device id (lspci's 10de:<id>, any case)."""
    return _BY_PCI_ID.get(device_id.lower())
