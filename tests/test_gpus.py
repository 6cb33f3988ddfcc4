"""The GPU catalog: figures consistent with the datasheets, names as nvidia-smi prints them."""

from __future__ import annotations

import pytest

from appliance.gpus import GPUS, PRECISION_ORDER, GpuSpec, find_gpu, find_pci_gpu


@pytest.mark.parametrize("spec", GPUS.values(), ids=list(GPUS))
def test_every_gpu_is_complete_and_consistent(spec: GpuSpec) -> None:
    assert spec.bandwidth_tbs > 0 and spec.link_gbs > 0 and spec.pcie_gbs > 0
    assert spec.nvlink_domain >= 1
    assert "bf16" in spec.precisions
    assert set(spec.precisions) <= set(PRECISION_ORDER)
    # nvidia-smi's MiB are within a few percent of the datasheet's decimal GB.
    assert 0.93 < spec.memory_bytes / (spec.memory_gb * 1e9) < 1.1
    # Every precision maps to a Tensor Core rate; FP8 is twice BF16 where it exists.
    for precision in spec.precisions:
        assert spec.compute_tflops(precision) >= spec.tflops["bf16"]
    if "fp8" in spec.tflops:
        assert spec.tflops["fp8"] == pytest.approx(2 * spec.tflops["bf16"], rel=0.02)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        # nvidia-smi --query-gpu=name,memory.total output seen on these GPUs.
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA H200 NVL", "H200-NVL"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
        # Keys and aliases, any case.
        ("h100", "H100-80GB"),
        ("H100-SXM", "H100-80GB"),
        ("h200-141gb", "H200"),
        ("b200", "B200"),
    ],
)
def test_find_gpu_maps_nvidia_smi_names_and_aliases(name: str, key: str) -> None:
    spec = find_gpu(name)
    assert spec is not None and spec.key == key


@pytest.mark.parametrize(
    "name", ["NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-40GB", "RTX 4090", ""]
)
def test_other_gpus_are_not_guessed(name: str) -> None:
    assert find_gpu(name) is None


def test_one_table_names_a_gpu_by_pci_id_and_by_nvidia_smi_alike() -> None:
    # The installer knows a GPU by its PCI id before a driver exists; the same table then
    # names it as nvidia-smi will, so a host reads the same before and after the driver.
    ids = [i for spec in GPUS.values() for i in spec.pci_ids]
    assert len(ids) == len(set(ids)) and len(ids) >= len(GPUS)
    for spec in GPUS.values():
        for pci_id in spec.pci_ids:
            assert find_pci_gpu(pci_id.upper()) is spec
            assert find_gpu(spec.smi_names[0]) is spec
    assert find_pci_gpu("2330") is GPUS["H100-80GB"]
    assert find_pci_gpu("233b") is GPUS["H200-NVL"]
    assert find_pci_gpu("ffff") is None


def test_datasheet_figures() -> None:
    # Dense = half the "with sparsity" figure NVIDIA prints (H100/H200 datasheets: FP8 3,958;
    # HGX B200: FP4 18 PFLOPS per GPU).
    assert GPUS["H100-80GB"].tflops["fp8"] == 1979.0
    assert GPUS["H200"].tflops == GPUS["H100-80GB"].tflops  # same GH100 silicon
    assert GPUS["H200"].bandwidth_tbs == 4.8
    assert GPUS["B200"].tflops["fp4"] == 9000.0
    assert GPUS["A100-80GB"].bandwidth_tbs == 2.039


def test_compute_rate_per_precision() -> None:
    h100, a100, b200 = GPUS["H100-80GB"], GPUS["A100-80GB"], GPUS["B200"]
    assert h100.compute_tflops("fp8") == h100.tflops["fp8"]
    # Weight-only formats multiply in BF16 ...
    assert h100.compute_tflops("int4-awq") == h100.tflops["bf16"]
    assert h100.compute_tflops("mxfp4") == h100.tflops["bf16"]
    # ... and so does everything on a GPU without FP8 Tensor Cores.
    assert "fp8" not in a100.precisions
    # Blackwell: NVFP4 at the FP4 rate, MXFP4 experts with FP8 activations.
    assert b200.compute_tflops("nvfp4") == 9000.0
    assert b200.compute_tflops("mxfp4") == 4500.0


def test_only_blackwell_runs_nvfp4() -> None:
    assert [key for key, spec in GPUS.items() if spec.supports("nvfp4")] == ["B200"]
