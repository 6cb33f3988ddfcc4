"""Clusters (parsed, detected) and where replicas go on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import PlanError
from appliance.installer.parsers import parse_smi_query
from appliance.placement import Cluster, Fit, Node, fit, local_cluster, parse_nvidia_smi, place
from appliance.planner import Plan


def test_parse_one_node() -> None:
    cluster = Cluster.parse("8xH100-80GB")
    assert cluster.nodes == (Node("node-0", "H100-80GB", 8, 81559),)
    assert cluster.total_gpus == 8
    assert cluster.describe() == "8xH100-80GB"


def test_parse_several_nodes_and_kinds() -> None:
    cluster = Cluster.parse("2x8xH200 + 4xl40s")
    assert [(n.name, n.gpu, n.gpus) for n in cluster.nodes] == [
        ("node-0", "H200", 8),
        ("node-1", "H200", 8),
        ("node-2", "L40S", 4),
    ]
    assert cluster.describe() == "2x8xH200+4xL40S"
    assert cluster.gpu_types() == ["H200", "L40S"]
    assert cluster.of_type("L40S").total_gpus == 4


@pytest.mark.parametrize("text", ["cpu", "none", "0", ""])
def test_parse_no_gpus(text: str) -> None:
    assert Cluster.parse(text) == Cluster.cpu_only()
    assert Cluster.cpu_only().describe() == "no GPUs"


def test_parse_a_bare_type_is_one_gpu() -> None:
    assert Cluster.parse("B200").nodes == (Node("node-0", "B200", 1, 183359),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8xH300", "unknown GPU type 'H300'"),
        ("8x", "is not NODESxGPUSxTYPE"),
        ("100xH100", "1-64 GPUs per node"),
        ("2x3x4xH100", "is not NODESxGPUSxTYPE"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Cluster.parse(text)


FIXTURES = Path(__file__).parent / "fixtures" / "hosts"
SMI_HEADER = (
    "index, name, pci.bus_id, driver_version, vbios_version, memory.total [MiB], persistence_mode\n"
)


def _smi(*rows: tuple[str, int]) -> str:
    """`nvidia-smi --query-gpu=<SMI_QUERY_FIELDS> --format=csv` as a driver prints it."""
    return SMI_HEADER + "".join(
        f"{i}, {name}, 00000000:{i + 0x10:02X}:00.0, 570.124.06, 96.00.A5.00.01, {mib} MiB, "
        "Enabled\n"
        for i, (name, mib) in enumerate(rows)
    )


def test_nvidia_smi_output_becomes_one_node_per_gpu_type() -> None:
    out = _smi(*[("NVIDIA H100 80GB HBM3", 81559)] * 8, ("NVIDIA RTX 4090", 24564))
    cluster = parse_nvidia_smi(out, "gpu-host")
    assert cluster.nodes == (
        Node("gpu-host", "H100-80GB", 8, 81559),
        Node("gpu-host-1", "NVIDIA RTX 4090", 1, 24564),  # unknown types keep their name
    )


@pytest.mark.parametrize(("host", "gpu"), [("h200-hgx", "H200"), ("h200-nvl", "H200-NVL")])
def test_placement_reads_the_installers_nvidia_smi_fixtures(host: str, gpu: str) -> None:
    # One query and one parser for preflight and placement: the fixtures preflight reads.
    text = (FIXTURES / host / "nvidia-smi-query.csv").read_text()
    cluster = parse_nvidia_smi(text, host)
    assert [(n.gpu, n.gpus) for n in cluster.nodes] == [(gpu, len(parse_smi_query(text)))]


def test_nvidia_smi_count_is_capped_by_what_ray_declares() -> None:
    out = _smi(*[("NVIDIA H200", 143771)] * 8)
    assert parse_nvidia_smi(out, "h", max_gpus=4).total_gpus == 4


def test_local_cluster_without_a_driver_has_no_gpus() -> None:
    one = _smi(("NVIDIA H200", 143771))
    assert local_cluster(query=lambda: None) == Cluster.cpu_only()
    assert local_cluster(max_gpus=0, query=lambda: one).total_gpus == 0
    assert local_cluster(query=lambda: one).nodes[0].gpu == "H200"


def test_unreadable_nvidia_smi_output_is_a_plan_error_that_says_what_to_do() -> None:
    with pytest.raises(PlanError, match="--gpus") as err:
        local_cluster(query=lambda: "NVIDIA H200, 143771 MiB\n")  # another query's format
    assert "cannot read the output of `nvidia-smi --query-gpu`" in str(err.value)


def test_replicas_fill_one_node() -> None:
    placement = place(Cluster.parse("8xH100-80GB"), tensor_parallel=4)
    assert placement.replicas == (("node-0",), ("node-0",))
    assert placement.left_free == ()
    assert "single point of failure" in placement.explanation


def test_replicas_spread_over_nodes_first_then_pack() -> None:
    placement = place(Cluster.parse("2x8xH200"), tensor_parallel=2, replicas=3)
    # One replica per node for availability; the third goes to the fuller node (best fit).
    assert placement.replicas == (("node-0",), ("node-1",), ("node-0",))
    assert dict(placement.left_free) == {"node-0": 4, "node-1": 6}
    assert "different nodes" in placement.explanation


def test_best_fit_keeps_large_blocks_free() -> None:
    # Another model already holds half of node-0.
    cluster = Cluster((Node("node-0", "H100-80GB", 4), Node("node-1", "H100-80GB", 8)))
    placement = place(cluster, tensor_parallel=4, replicas=1)
    assert placement.replicas == (("node-0",),)
    assert dict(placement.left_free) == {"node-1": 8}


def test_a_tensor_parallel_group_never_spans_nodes() -> None:
    placement = place(Cluster.parse("2x4xH100-80GB"), tensor_parallel=8)
    assert placement.replicas == ()
    assert "largest free block is 4 GPU(s)" in placement.explanation


def test_pipeline_stages_go_to_different_nodes() -> None:
    placement = place(Cluster.parse("2x8xH100-80GB"), tensor_parallel=8, pipeline_parallel=2)
    assert placement.replicas == (("node-0", "node-1"),)
    assert "spans 2 nodes" in placement.explanation


def test_a_shortfall_is_explained() -> None:
    placement = place(Cluster.parse("8xH200"), tensor_parallel=4, replicas=3)
    assert len(placement.replicas) == 2
    assert "Only 2 of the 3 replicas requested fit" in placement.explanation


# Ray's view, and the supervisor's placement of every deployed model on it (`fit`).


def _ray_node(node_id: str, name: str, gpus: int, kind: str | None = "H100") -> dict[str, object]:
    resources: dict[str, float] = {"CPU": 8.0, "GPU": float(gpus)}
    if kind:
        resources[f"accelerator_type:{kind}"] = 1.0
    return {"NodeID": node_id, "NodeName": name, "Alive": True, "Resources": resources}


def test_rays_view_names_nodes_and_reads_their_gpu_type() -> None:
    nodes = [
        _ray_node("bb" * 28, "gpu02", 8),
        _ray_node("aa" * 28, "gpu01", 8),
        {**_ray_node("cc" * 28, "gpu03", 8), "Alive": False},  # a dead node holds nothing
        _ray_node("dd" * 28, "cpu01", 0, kind=None),
    ]
    cluster = Cluster.from_ray(nodes)
    assert [(n.name, n.gpu, n.gpus, n.accelerator) for n in cluster.nodes] == [
        ("cpu01", "", 0, ""),
        ("gpu01", "H100-80GB", 8, "H100"),
        ("gpu02", "H100-80GB", 8, "H100"),
    ]
    assert cluster.node("gpu01").node_id == "aa" * 28
    assert cluster.with_gpus().describe() == "2x8xH100-80GB"


def test_nodes_sharing_a_name_are_told_apart_by_their_id() -> None:
    # Several raylets on one host (a test cluster) all take the host's address as name.
    cluster = Cluster.from_ray(
        [_ray_node("a1" * 28, "10.0.0.5", 2), _ray_node("b2" * 28, "10.0.0.5", 2)]
    )
    assert [n.name for n in cluster.nodes] == ["10.0.0.5-a1a1a1a1", "10.0.0.5-b2b2b2b2"]


def _plan(replicas: int, gpus: int, pp: int = 1, gpu: str | None = None) -> Plan:
    return Plan(
        engine="vllm",
        precision="bf16",
        replicas=replicas,
        tensor_parallel=gpus or 1,
        pipeline_parallel=pp,
        gpus_per_replica=gpus * pp,
        gpu=gpu,
    )


def _nodes(**gpus: int) -> Cluster:
    return Cluster(tuple(Node(name, "", count) for name, count in gpus.items()))


def test_fit_keeps_each_replica_inside_one_node() -> None:
    fits = fit([("a", _plan(3, 4))], _nodes(n1=8, n2=4))
    assert fits["a"] == Fit((("n2",), ("n1",), ("n1",)))  # best fit first, then spread
    # 4 GPUs free across two nodes is not room for a TP-4 replica.
    fits = fit([("a", _plan(2, 4))], _nodes(n1=2, n2=2))
    assert fits["a"].replicas == 0 and "each needs 4 GPUs on one node" in fits["a"].message


def test_fit_takes_models_in_the_order_given() -> None:
    fits = fit([("first", _plan(1, 4)), ("second", _plan(2, 4))], _nodes(n1=8))
    assert fits["first"].replicas == 1
    assert fits["second"].replicas == 1
    assert fits["second"].message.startswith("1 of 2 replicas placed")


def test_fit_keeps_room_for_big_replicas() -> None:
    # The TP-2 replica goes to the 2-GPU node, leaving the 8-GPU node whole for TP-8.
    fits = fit([("small", _plan(1, 2)), ("big", _plan(1, 8))], _nodes(a=8, b=2))
    assert fits == {"small": Fit((("b",),)), "big": Fit((("a",),))}


def test_every_replica_on_a_node_counts_against_it() -> None:
    fits = fit([("a", _plan(2, 4)), ("b", _plan(1, 4))], _nodes(n1=8))
    assert fits["a"].replicas == 2
    assert fits["b"].replicas == 0 and "the nodes have 0 GPUs free" in fits["b"].message


def test_fit_places_the_stages_of_a_replica_on_distinct_nodes() -> None:
    fits = fit([("big", _plan(1, 8, pp=2))], _nodes(n1=8, n2=8))
    assert fits["big"] == Fit((("n1", "n2"),))
    # One node left: the replica cannot run, and says what it needs.
    fits = fit([("big", _plan(1, 8, pp=2))], _nodes(n1=8))
    assert fits["big"].replicas == 0
    assert "each needs 8 GPUs on each of 2 nodes" in fits["big"].message


def test_fit_uses_nodes_of_the_plans_gpu_type_and_untyped_ones() -> None:
    cluster = Cluster((Node("l40s", "L40S", 8), Node("h100", "H100-80GB", 4), Node("any", "", 4)))
    fits = fit([("m", _plan(3, 4, gpu="H100-80GB"))], cluster)
    assert sorted(s[0] for s in fits["m"].placed) == ["any", "h100"]
    assert "each needs 4 H100-80GB GPUs on one node" in fits["m"].message


def test_cpu_plans_take_no_gpus() -> None:
    assert fit([("cpu", _plan(2, 0))], Cluster.cpu_only())["cpu"].replicas == 2


def test_a_node_ray_names_by_family_counts_for_every_type_of_it() -> None:
    # Ray calls an H100 NVL board "H100", which the planner reads as the SXM one.
    [node] = Cluster.from_ray([_ray_node("ee" * 28, "gpu05", 4)]).nodes
    assert node.gpu == "H100-80GB"
    fits = fit([("m", _plan(1, 4, gpu="H100-NVL"))], Cluster((node,)))
    assert fits["m"].placed == (("gpu05",),)
