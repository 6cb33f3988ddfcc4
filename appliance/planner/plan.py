"""The plan a model gets: engine, precision, GPUs and placement."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    engine: str
    precision: str
    replicas: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    gpus_per_replica: int = 0
    cpus_per_replica: float = 1.0
    max_model_len: int | None = None
    gpu: str | None = None  # GPU type key (appliance.gpus); None for CPU plans
    kv_cache_dtype: str | None = None  # "bf16" or "fp8"; engines' "auto" picks the same
    max_num_seqs: int | None = None  # the engine's concurrent-sequence limit
    placement: tuple[tuple[str, ...], ...] = ()  # per replica, the node of each PP stage
    explanation: str = ""

    @property
    def on_cpu(self) -> bool:
        """The engine computes on the host's CPUs (vLLM's CPU build): no GPUs at all."""
        return self.gpus_per_replica == 0

    @property
    def spans_nodes(self) -> bool:
        """Some replica has pipeline stages on more than one node."""
        return any(len(set(stages)) > 1 for stages in self.placement)

    def gpus_per_node(self) -> dict[str, int]:
        """GPUs this plan takes on each node: for `Cluster.without` when planning the next."""
        used: dict[str, int] = {}
        for stages in self.placement:
            for node in stages:
                used[node] = used.get(node, 0) + self.tensor_parallel
        return used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan in `to_dict`'s form; fields a newer version added are ignored, as
        when a record holding a plan is read (appliance.control.records)."""
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(data)
