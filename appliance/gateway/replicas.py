"""The gateway's view of live replicas, and where it comes from.

A source (the Ray registry, or a static list for benchmarks) replaces the snapshot as a
whole; the table adds what only the gateway knows: requests in flight per replica and
replicas that just refused a connection. Picking is least-outstanding-requests among
healthy replicas of the model, ties broken in turn.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("appliance.gateway")

# How long a replica that refused a connection is skipped before it is tried again.
FAILED_BACKOFF_S = 5.0


@dataclass(frozen=True)
class Replica:
    replica_id: str
    model: str
    url: str
    engine_model: str  # what requests must name
    response_model: str  # what responses name
    api_key: str | None = None  # what the engine requires (Authorization: Bearer)

    @property
    def rewrites_request(self) -> bool:
        return self.engine_model != self.model

    @property
    def rewrites_response(self) -> bool:
        return self.response_model != self.model


class Overloaded(Exception):
    """Every healthy replica of the model is full and so is its queue in the gateway."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(reason)
        self.model = model
        self.reason = reason


class ReplicaTable:
    """Live replicas by model, with what only the gateway knows: requests in flight per
    replica, replicas that just refused a connection, and requests waiting for room.

    A replica takes at most `capacity` requests at once (its plan's max_num_seqs): more
    would only queue inside the engine, where they cannot be routed elsewhere and hold
    memory. Beyond that, requests wait here in arrival order, at most `queue_per_replica`
    per healthy replica and at most `timeout_s` each; past either bound, `Overloaded`.
    """

    def __init__(self) -> None:
        self.loaded = False
        self.models: tuple[str, ...] = ()
        self._by_model: dict[str, tuple[Replica, ...]] = {}
        self.in_flight: dict[str, int] = {}
        self._failed_until: dict[str, float] = {}
        self._turn = itertools.count()
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def replace(self, models: list[str], replicas: list[Replica]) -> None:
        """Swap in a new snapshot (callable from any thread: one reference assignment)."""
        by_model: dict[str, list[Replica]] = {m: [] for m in models}
        for replica in replicas:
            by_model.setdefault(replica.model, []).append(replica)
        self._by_model = {m: tuple(rs) for m, rs in by_model.items()}
        self.models = tuple(sorted(by_model))
        self.loaded = True
        if self._loop is not None and any(self._waiters.values()):
            # New replicas may have room: let waiters look again (on the loop's thread).
            self._loop.call_soon_threadsafe(self._wake_all)

    def knows(self, model: str) -> bool:
        return model in self._by_model

    def healthy(self, model: str) -> list[Replica]:
        now = time.monotonic()
        return [
            r
            for r in self._by_model.get(model, ())
            if self._failed_until.get(r.replica_id, 0.0) <= now
        ]

    def pick(
        self,
        model: str,
        exclude: frozenset[str] = frozenset(),
        capacity: int | None = None,
    ) -> Replica | None:
        """The least loaded healthy replica with room; ties taken in turn."""
        candidates = [
            r
            for r in self.healthy(model)
            if r.replica_id not in exclude
            and (capacity is None or self.in_flight.get(r.replica_id, 0) < capacity)
        ]
        if not candidates:
            return None
        least = min(self.in_flight.get(r.replica_id, 0) for r in candidates)
        tied = [r for r in candidates if self.in_flight.get(r.replica_id, 0) == least]
        return tied[next(self._turn) % len(tied)]

    async def admit(
        self,
        model: str,
        capacity: int | None,
        queue_per_replica: int,
        timeout_s: float,
        exclude: frozenset[str] = frozenset(),
    ) -> Replica | None:
        """A replica with room, acquired; waits in line when all are full.

        None when the model has no healthy replica (not even a full one) to wait for.
        """
        self._loop = asyncio.get_running_loop()
        waiters = self._waiters.setdefault(model, deque())
        if not waiters:
            replica = self.pick(model, exclude, capacity)
            if replica is not None:
                self.acquire(replica)
                return replica
        healthy = [r for r in self.healthy(model) if r.replica_id not in exclude]
        if not healthy:
            return None
        if len(waiters) >= queue_per_replica * len(healthy):
            raise Overloaded(
                model,
                f"all {len(healthy)} replicas of '{model}' are busy and {len(waiters)} "
                "requests are already waiting",
            )
        deadline = time.monotonic() + timeout_s
        first = False  # a waiter that was woken but lost the race keeps its place
        while True:
            fut = self._loop.create_future()
            if first:
                waiters.appendleft(fut)
            else:
                waiters.append(fut)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await fut
            except BaseException as exc:
                if fut in waiters:
                    waiters.remove(fut)
                elif fut.done() and not fut.cancelled():
                    self._wake(model)  # woken, but leaving (timed out, cancelled): pass it on
                if isinstance(exc, TimeoutError):
                    raise Overloaded(
                        model, f"no replica of '{model}' had room within {timeout_s:g} seconds"
                    ) from None
                raise
            replica = self.pick(model, exclude, capacity)
            if replica is not None:
                self.acquire(replica)
                if waiters and self.pick(model, exclude, capacity) is not None:
                    self._wake(model)
                return replica
            if not [r for r in self.healthy(model) if r.replica_id not in exclude]:
                return None
            first = True

    def _wake(self, model: str) -> None:
        waiters = self._waiters.get(model)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_all(self) -> None:
        for model in list(self._waiters):
            self._wake(model)

    def waiting(self, model: str) -> int:
        return len(self._waiters.get(model, ()))

    def acquire(self, replica: Replica) -> None:
        self.in_flight[replica.replica_id] = self.in_flight.get(replica.replica_id, 0) + 1

    def release(self, replica: Replica) -> None:
        left = self.in_flight.get(replica.replica_id, 1) - 1
        if left > 0:
            self.in_flight[replica.replica_id] = left
        else:
            self.in_flight.pop(replica.replica_id, None)
        if self._waiters.get(replica.model):
            self._wake(replica.model)

    def mark_failed(self, replica: Replica) -> None:
        self._failed_until[replica.replica_id] = time.monotonic() + FAILED_BACKOFF_S

    def counts(self) -> dict[str, int]:
        return {m: len(self.healthy(m)) for m in self.models}


def replicas_from_snapshot(snapshot: dict[str, Any]) -> list[Replica]:
    return [
        Replica(
            r["replica_id"],
            r["model"],
            r["url"],
            r["engine_model"],
            r.get("response_model") or r["engine_model"],
            r.get("engine_key"),
        )
        for r in snapshot["replicas"]
        if r.get("healthy") and r.get("fresh")
    ]


class StaticSource:
    """A fixed list of replicas (`--static-replica NAME=URL`): benchmarks, debugging."""

    def __init__(self, table: ReplicaTable, pairs: list[tuple[str, str]]) -> None:
        replicas = [
            Replica(f"static-{i}", model, url.rstrip("/"), model, model)
            for i, (model, url) in enumerate(pairs)
        ]
        table.replace(sorted({m for m, _ in pairs}), replicas)

    def stop(self) -> None:
        pass


class RayRegistrySource:
    """Polls the registry actor from a background thread: the gateway joins Ray as a driver."""

    def __init__(
        self, table: ReplicaTable, address: str, interval_s: float, stale_after_s: float
    ) -> None:
        self.table = table
        self.address = address
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-source", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        from appliance.control import NAMESPACE, REGISTRY_NAME

        ray.init(
            address=self.address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        handle: Any = None
        while not self._stop.is_set():
            try:
                if handle is None:
                    handle = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
                snapshot: dict[str, Any] = ray.get(
                    handle.snapshot.remote(self.stale_after_s), timeout=5
                )
                self.table.replace(snapshot["models"], replicas_from_snapshot(snapshot))
            except Exception as exc:
                handle = None
                log.warning("replica registry not readable yet: %r", exc)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
