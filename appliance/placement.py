"""The GPUs a cluster has free, and where a model's replicas go on them: the one placer.

A cluster is a list of nodes, each with one GPU type and a count of free GPUs. It comes
from Ray's view of the nodes (`Cluster.from_ray`, what `model add`, `plan` and the
supervisor all place on; appliance.control.cluster says where that view is read), from
this host's nvidia-smi where no Ray runs yet (`local_cluster`), or from text (``--gpus``)::

    8xH100-80GB            one node with 8 H100 SXM 80GB
    2x8xH200               two nodes with 8 H200 each
    8xH200+4xL40S          a node of 8 H200 and a node of 4 L40S
    cpu (or none, 0)       no GPUs

GPU types are the keys of ``appliance.gpus.GPUS`` or their aliases, in any case.

Placement rules: a tensor-parallel group stays inside one node (its NVLink domain); the
stages of a pipeline-parallel replica go to different nodes; the first replicas go to
different nodes so that losing one node does not take the model down, and the rest are
packed onto the node with the fewest free GPUs that still fits them (best fit), which keeps
large blocks free for models that need many GPUs. `place` decides this for one model when
it is planned; `fit` decides it again for every deployed model on the nodes alive now.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from appliance.errors import PlanError
from appliance.gpus import GpuSpec, find_gpu, known_gpus
from appliance.installer.parsers import SMI_QUERY_FIELDS, ProbeFormatError, parse_smi_query

if TYPE_CHECKING:
    from appliance.planner.plan import Plan

_PART = re.compile(r"^(?:(\d+)\s*[xX*]\s*)?(?:(\d+)\s*[xX*]\s*)?([A-Za-z][\w.-]*)$")
_NO_GPUS = {"", "0", "cpu", "none"}


@dataclass(frozen=True)
class Node:
    """One host: its GPU type (a catalog key, or the reported name when unknown; "" when
    nothing says), free GPUs; from Ray, its node id and the accelerator name Ray gave it."""

    name: str
    gpu: str
    gpus: int
    memory_mib: int | None = None
    node_id: str = ""
    accelerator: str = ""  # Ray's `accelerator_type:<name>` resource, e.g. "H100"

    @property
    def spec(self) -> GpuSpec | None:
        return find_gpu(self.gpu)


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...] = ()

    @classmethod
    def cpu_only(cls) -> Cluster:
        return cls(())

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """'8xH100-80GB', '2x8xH200', '8xH200+4xL40S', 'cpu'; ValueError says what is wrong."""
        if text.strip().lower() in _NO_GPUS:
            return cls.cpu_only()
        nodes: list[Node] = []
        for part in re.split(r"[+,]", text):
            match = _PART.match(part.strip())
            if not match:
                raise ValueError(
                    f"'{part.strip()}' is not NODESxGPUSxTYPE, GPUSxTYPE or TYPE "
                    "(e.g. 8xH100-80GB, 2x8xH200)"
                )
            first, second, kind = match.groups()
            node_count, gpu_count = (int(first), int(second)) if second else (1, int(first or 1))
            spec = find_gpu(kind)
            if spec is None:
                raise ValueError(f"unknown GPU type '{kind}'; known types: {known_gpus()}")
            if not 1 <= gpu_count <= 64 or not 1 <= node_count <= 1024:
                raise ValueError(f"'{part.strip()}': 1-64 GPUs per node and 1-1024 nodes")
            for _ in range(node_count):
                nodes.append(Node(f"node-{len(nodes)}", spec.key, gpu_count, spec.memory_mib))
        return cls(tuple(nodes))

    @classmethod
    def from_ray(cls, nodes: list[dict[str, Any]]) -> Cluster:
        """The live nodes of `ray.nodes()`: GPUs as Ray counts them (declared or detected),
        the GPU type from the `accelerator_type:<name>` resource Ray sets for NVIDIA GPUs.

        A node is named by Ray's node name (the installer sets it to the host's inventory
        name, the embedded Ray to the host name), with its id's start where two share one.
        """
        alive = [n for n in nodes if n.get("Alive")]
        names = Counter(str(n.get("NodeName") or n["NodeID"]) for n in alive)
        found: list[Node] = []
        for node in sorted(alive, key=lambda n: str(n.get("NodeName") or n["NodeID"])):
            resources: dict[str, float] = node.get("Resources") or {}
            name = str(node.get("NodeName") or node["NodeID"])
            if names[name] > 1:
                name = f"{name}-{str(node['NodeID'])[:8]}"
            kinds = [k.partition(":")[2] for k in resources if k.startswith("accelerator_type:")]
            accelerator = kinds[0] if kinds else ""
            spec = find_gpu(accelerator) if accelerator else None
            found.append(
                Node(
                    name,
                    spec.key if spec else accelerator,
                    int(resources.get("GPU", 0)),
                    spec.memory_mib if spec else None,
                    node_id=str(node["NodeID"]),
                    accelerator=accelerator,
                )
            )
        return cls(tuple(found))

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    @property
    def total_gpus(self) -> int:
        return sum(node.gpus for node in self.nodes)

    def gpu_types(self) -> list[str]:
        """GPU types present, most GPUs first."""
        counts: Counter[str] = Counter()
        for node in self.nodes:
            counts[node.gpu] += node.gpus
        return [gpu for gpu, _ in counts.most_common()]

    def without(self, used: Mapping[str, int]) -> Cluster:
        """The GPUs left once `used` (node name -> GPUs, e.g. other models' plans) are taken."""
        return Cluster(
            tuple(replace(n, gpus=max(0, n.gpus - used.get(n.name, 0))) for n in self.nodes)
        )

    def of_type(self, gpu: str) -> Cluster:
        return Cluster(tuple(n for n in self.nodes if n.gpu == gpu and n.gpus > 0))

    def with_gpus(self) -> Cluster:
        """Less the nodes without GPUs, which hold no GPU replica (CPU plans place nowhere)."""
        return Cluster(tuple(n for n in self.nodes if n.gpus > 0))

    def usable_by(self, gpu: str | None) -> Cluster:
        """The nodes a plan for GPU type `gpu` may run on: that type, or nodes whose type
        nothing reports (GPUs declared to Ray by count only); all for a plan without one.

        Ray names GPUs by family (`H100` for the SXM and NVL boards alike), so a node Ray
        describes also counts for the other types of its family.
        """
        if gpu is None:
            return self
        family = gpu.split("-")[0].upper()
        return Cluster(
            tuple(
                n
                for n in self.nodes
                if n.gpu in (gpu, "") or (n.accelerator.split("-")[0].upper() == family)
            )
        )

    def describe(self) -> str:
        """The --gpus text for this cluster, e.g. '2x8xH200'; 'no GPUs' when empty."""
        groups: Counter[tuple[int, str]] = Counter((n.gpus, n.gpu) for n in self.nodes if n.gpus)
        if not groups:
            return "no GPUs"
        return "+".join(
            f"{nodes}x{gpus}x{gpu}" if nodes > 1 else f"{gpus}x{gpu}"
            for (gpus, gpu), nodes in groups.items()
        )


def parse_nvidia_smi(text: str, host: str, max_gpus: int | None = None) -> Cluster:
    """A one-host cluster from `nvidia-smi --query-gpu=<SMI_QUERY_FIELDS> --format=csv`, read
    by the installer's parser (one nvidia-smi parser for preflight and placement). max_gpus
    caps the count (Ray's num_gpus). Raises ProbeFormatError on text it cannot read."""
    found: dict[str, list[int]] = {}
    for smi in parse_smi_query(text):
        spec = find_gpu(smi.name)
        found.setdefault(spec.key if spec else smi.name, []).append(smi.memory_mib or 0)
    budget = max_gpus if max_gpus is not None else sum(len(m) for m in found.values())
    nodes: list[Node] = []
    for gpu, memories in found.items():
        count = min(len(memories), budget)
        budget -= count
        if count:
            suffix = f"-{len(nodes)}" if nodes else ""
            nodes.append(Node(f"{host}{suffix}", gpu, count, min(memories) or None))
    return Cluster(tuple(nodes))


def _query_nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(SMI_QUERY_FIELDS)}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def local_cluster(
    max_gpus: int | None = None, query: Callable[[], str | None] = _query_nvidia_smi
) -> Cluster:
    """This host's GPUs as nvidia-smi lists them; no GPUs without a driver. The node is
    named by the host name, as the embedded Ray names its node (the supervisor says so)."""
    out = query()
    if not out or max_gpus == 0:
        return Cluster.cpu_only()
    try:
        return parse_nvidia_smi(out, socket.gethostname(), max_gpus)
    except ProbeFormatError as exc:
        raise PlanError(
            f"{exc}: cannot tell which GPUs this host has",
            hint="Name them instead, e.g. `--gpus 8xH100-80GB` (or [ray] num_gpus = 0 for "
            "none), and check the driver with `nvidia-smi`.",
        ) from None


@dataclass(frozen=True)
class Placement:
    """Where each replica's pipeline stages go: one node name per stage."""

    tensor_parallel: int
    pipeline_parallel: int
    replicas: tuple[tuple[str, ...], ...]
    left_free: tuple[tuple[str, int], ...]
    explanation: str


def place(
    cluster: Cluster, tensor_parallel: int, pipeline_parallel: int = 1, replicas: int | None = None
) -> Placement:
    """Place replicas of tensor_parallel x pipeline_parallel GPUs; replicas None: as many as fit."""
    order = {node.name: i for i, node in enumerate(cluster.nodes)}
    free = {node.name: node.gpus for node in cluster.nodes}
    placed: list[tuple[str, ...]] = []
    while replicas is None or len(placed) < replicas:
        hosting = Counter(name for stages in placed for name in stages)
        stages: list[str] = []
        for _ in range(pipeline_parallel):
            options = [n for n in free if free[n] >= tensor_parallel and n not in stages]
            if not options:
                break
            # Nodes without a replica of this model first (availability), then best fit.
            pick = min(options, key=lambda n: (min(hosting[n], 1), free[n], order[n]))
            stages.append(pick)
            free[pick] -= tensor_parallel
        if len(stages) < pipeline_parallel:
            for name in stages:
                free[name] += tensor_parallel
            break
        placed.append(tuple(stages))
    left = tuple((name, count) for name, count in free.items() if count)
    text = _explain(cluster, tensor_parallel, pipeline_parallel, placed, left, replicas)
    return Placement(tensor_parallel, pipeline_parallel, tuple(placed), left, text)


def _explain(
    cluster: Cluster,
    tp: int,
    pp: int,
    placed: list[tuple[str, ...]],
    left: tuple[tuple[str, int], ...],
    wanted: int | None,
) -> str:
    group = f"TP{tp}" + (f" x PP{pp}" if pp > 1 else "")
    size = tp * pp
    if not placed:
        largest = max((n.gpus for n in cluster.nodes), default=0)
        return (
            f"No replica of {size} GPU(s) ({group}) fits: the largest free block is "
            f"{largest} GPU(s) on one node, and a tensor-parallel group must stay in one node."
        )
    per_node = Counter(name for stages in placed for name in stages)
    where = ", ".join(f"{name} x{count}" for name, count in per_node.items())
    lines = [f"{len(placed)} replica(s) of {size} GPU(s) ({group}): {where}."]
    if pp > 1:
        lines.append(
            f"Each replica spans {pp} nodes, one pipeline stage of {tp} GPU(s) per node; "
            "stage-to-stage traffic crosses the network."
        )
    if len(per_node) > 1 and len(placed) > 1:
        lines.append(
            "Replicas went to different nodes first, so losing one node leaves the model up; "
            "the rest were packed onto the fullest node that fits them."
        )
    elif len(placed) > 1:
        lines.append("All replicas share one node: that node is a single point of failure.")
    if wanted is not None and len(placed) < wanted:
        lines.append(f"Only {len(placed)} of the {wanted} replicas requested fit.")
    free_text = ", ".join(f"{name}: {count}" for name, count in left) or "none"
    lines.append(f"GPUs left free: {free_text}.")
    return " ".join(lines)


@dataclass(frozen=True)
class Fit:
    """Where a deployed model's replicas go on the nodes alive now, and why not all do."""

    placed: tuple[tuple[str, ...], ...]  # per replica, the node of each pipeline stage
    message: str = ""

    @property
    def replicas(self) -> int:
        return len(self.placed)


def fit(plans: list[tuple[str, Plan]], cluster: Cluster) -> dict[str, Fit]:
    """The replicas of every deployed model that the cluster's GPUs hold, by `place`'s rules.

    Models are taken in the order given (the order they were added), each on the GPUs the
    ones before it left, on nodes of its plan's GPU type. A replica that cannot be placed
    is reported here rather than left pending in Ray. CPU plans are not placed on GPUs:
    all their replicas count.
    """
    free = cluster
    fits: dict[str, Fit] = {}
    for model, plan in plans:
        tp, pp = plan.tensor_parallel, plan.pipeline_parallel
        if plan.on_cpu:
            fits[model] = Fit(tuple(() for _ in range(plan.replicas)))
            continue
        placement = place(free.usable_by(plan.gpu), tp, pp, plan.replicas)
        used: Counter[str] = Counter()
        for stages in placement.replicas:
            for name in stages:
                used[name] += tp
        free = free.without(used)
        message = ""
        if len(placement.replicas) < plan.replicas:
            message = _shortfall(plan, len(placement.replicas), free.usable_by(plan.gpu))
        fits[model] = Fit(placement.replicas, message)
    return fits


def _shortfall(plan: Plan, placed: int, left: Cluster) -> str:
    tp, pp = plan.tensor_parallel, plan.pipeline_parallel
    kind = f"{plan.gpu} " if plan.gpu else ""
    each = (
        f"each needs {tp} {kind}GPUs on each of {pp} nodes"
        if pp > 1
        else f"each needs {plan.gpus_per_replica} {kind}GPUs on one node"
    )
    counts = ", ".join(str(g) for g in sorted((n.gpus for n in left.nodes), reverse=True))
    return (
        f"{placed} of {plan.replicas} replicas placed: {each}, and the nodes have "
        f"{counts or 'none'} GPUs free. Add GPU hosts, remove a model, or plan fewer replicas."
    )
