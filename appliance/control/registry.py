"""The live replica table, held by one named Ray actor.

Replicas report their engine URL, health and load every few hundred milliseconds; the
gateway reads a snapshot. Ages are measured on the registry's own clock, so clocks that
disagree between hosts do not matter.
"""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote(num_cpus=0, max_concurrency=64)  # type: ignore[call-overload]
class ReplicaRegistry:
    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        self._models: list[str] = []

    def set_models(self, models: list[str]) -> None:
        """The models that are deployed, whether or not a replica is up."""
        self._models = sorted(models)
        self._replicas = {k: v for k, v in self._replicas.items() if v["model"] in models}

    def report(self, info: dict[str, Any]) -> None:
        self._replicas[info["replica_id"]] = {**info, "received_at": time.monotonic()}

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def snapshot(self, max_age_s: float = 5.0) -> dict[str, Any]:
        now = time.monotonic()
        # A replica that stopped reporting (killed, its node gone) shows as not fresh at
        # once and is dropped soon after: status must not list it for minutes.
        stale = [k for k, v in self._replicas.items() if now - v["received_at"] > 3 * max_age_s]
        for key in stale:
            del self._replicas[key]
        replicas = []
        for info in self._replicas.values():
            age = now - info["received_at"]
            entry = {k: v for k, v in info.items() if k != "received_at"}
            entry["age_s"] = round(age, 3)
            entry["fresh"] = age <= max_age_s
            replicas.append(entry)
        return {"models": list(self._models), "replicas": replicas}


def get_or_create_registry() -> Any:
    from appliance.control import NAMESPACE, REGISTRY_NAME

    return ReplicaRegistry.options(  # type: ignore[attr-defined]
        name=REGISTRY_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
