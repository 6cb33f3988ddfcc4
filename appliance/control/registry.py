"""The live replica table, held by one named Ray actor.

Replicas report their engine URL, health and load every few hundred milliseconds; the
gateway reads a snapshot. Ages are measured on the registry's own clock, so clocks that
disagree between hosts do not matter.

It is also where scaling's two signals meet (control/scaling.py): each gateway worker
reports, with every snapshot it reads, the requests it holds per model and how long ago
its last request for each came (`demand`); the supervisor reads them summed over the
workers and publishes each model's scaling state back (`set_models`), which the gateway
reads to know which models a request may wait for while they have no replica. Every
worker of every gateway host already talks to this actor, so the signal needs no file
shared between processes and reaches the supervisor from any host.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import ray

from appliance.control.records import (
    GatewayDemand,
    ModelActivity,
    RegistrySnapshot,
    ReplicaInfo,
    ReplicaState,
    ScaleState,
)


@ray.remote(num_cpus=0, max_concurrency=64)  # type: ignore[call-overload]
class ReplicaRegistry:
    """Takes ReplicaInfo as plain data and gives out RegistrySnapshot as plain data: both
    ends validate them with appliance.control.records."""

    def __init__(self) -> None:
        self._replicas: dict[str, tuple[ReplicaInfo, float]] = {}  # id -> (report, received)
        self._models: list[str] = []
        self._scale: dict[str, ScaleState] = {}
        # gateway worker -> (its last report, received)
        self._demand: dict[str, tuple[GatewayDemand, float]] = {}

    def set_models(self, models: list[str], scale: dict[str, dict[str, Any]] | None = None) -> None:
        """The models that are deployed, whether or not a replica is up, and the
        supervisor's scaling state of each."""
        self._models = sorted(models)
        self._replicas = {k: v for k, v in self._replicas.items() if v[0].model in models}
        if scale is not None:
            self._scale = {m: ScaleState.model_validate(s) for m, s in scale.items()}

    def demand(self, worker: str, report: dict[str, Any]) -> None:
        """One gateway worker's requests held and last request per model."""
        self._demand[worker] = (GatewayDemand.model_validate(report), time.monotonic())

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
        return RegistrySnapshot(
            models=list(self._models),
            replicas=replicas,
            scale=dict(self._scale),
            demand=self._summed_demand(now, max_age_s),
        ).model_dump()

    def _summed_demand(self, now: float, max_age_s: float) -> dict[str, ModelActivity]:
        """Over the workers that reported within max_age_s (a worker that died, or a
        gateway that stopped, stops counting): requests held, summed; the time since
        the last request, the least (each aged by its report's own age)."""
        self._demand = {k: v for k, v in self._demand.items() if now - v[1] <= max_age_s}
        waiting: dict[str, int] = {}
        idle: dict[str, float] = {}
        for report, at in self._demand.values():
            for model, seen in report.models.items():
                waiting[model] = waiting.get(model, 0) + seen.waiting
                if seen.idle_s is not None:
                    aged = seen.idle_s + (now - at)
                    idle[model] = min(idle.get(model, aged), aged)
        return {
            m: ModelActivity(waiting=waiting[m], idle_s=round(idle[m], 3) if m in idle else None)
            for m in waiting
        }


def dead_replicas(replicas: Iterable[ReplicaInfo], alive_actors: set[str]) -> list[str]:
    """The replicas whose Ray actor is gone: killed without running its `__del__` (Serve's
    kill at graceful_shutdown_timeout_s, a crashed worker process, `ray.kill`), so it
    never forgot itself. `alive_actors` must be listed after the replicas were read: a
    replica started in between would otherwise look dead (and come back at its next
    report). A replica that reports no actor name (an older writer) is never one."""
    return [r.replica_id for r in replicas if r.actor and r.actor not in alive_actors]


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
