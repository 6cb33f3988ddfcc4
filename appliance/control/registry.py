"""The live replica table, held by one named Ray actor.

Replicas report their engine URL, health and load every few hundred milliseconds; the
gateway reads a snapshot. Ages are measured on the registry's own clock, so clocks that
disagree between hosts do not matter.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from appliance.control.records import RegistrySnapshot, ReplicaInfo, ReplicaState


@ray.remote(num_cpus=0, max_concurrency=64)  # type: ignore[call-overload]
class ReplicaRegistry:
    """Takes ReplicaInfo as plain data and gives out RegistrySnapshot as plain data: both
    ends validate them with appliance.control.records."""

    def __init__(self) -> None:
        self._replicas: dict[str, tuple[ReplicaInfo, float]] = {}  # id -> (report, received)
        self._models: list[str] = []

    def set_models(self, models: list[str]) -> None:
        """The models that are deployed, whether or not a replica is up."""
        self._models = sorted(models)
        self._replicas = {k: v for k, v in self._replicas.items() if v[0].model in models}

    def report(self, info: dict[str, Any]) -> None:
        report = ReplicaInfo.model_validate(info)
        self._replicas[report.replica_id] = (report, time.monotonic())

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def snapshot(self, max_age_s: float = 5.0) -> dict[str, Any]:
        now = time.monotonic()
        # A replica that stopped reporting (killed, its node gone) shows as not fresh at
        # once and is dropped soon after: status must not list it for minutes.
        stale = [k for k, (_, at) in self._replicas.items() if now - at > 3 * max_age_s]
        for key in stale:
            del self._replicas[key]
        replicas = [
            ReplicaState(**dict(info), age_s=round(now - at, 3), fresh=now - at <= max_age_s)
            for info, at in self._replicas.values()
        ]
        return RegistrySnapshot(models=list(self._models), replicas=replicas).model_dump()


def get_or_create_registry() -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from appliance.control import NAMESPACE, REGISTRY_NAME

    return ReplicaRegistry.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        # On the supervisor's node: an actor needing no CPU could land on any node, and
        # the table must not go with a GPU node that fails.
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        ),
    ).remote()
