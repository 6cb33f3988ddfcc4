"""The gateway's view of live replicas, and where it comes from.

A source (the Ray registry, or a static list for benchmarks) replaces the snapshot as a
whole; the table adds what only the gateway knows: requests in flight per replica and
replicas that just refused a connection. Which healthy replica with room takes a request
is routing.Chooser's call: engine load, these counts and prefix affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import GatewayRouting
from appliance.control.records import GatewayDemand, ModelActivity, RegistrySnapshot, ScaleState
from appliance.engines.base import EngineLoad
from appliance.gateway.prefix import Route
from appliance.gateway.routing import Chooser
from appliance.gateway.shared import WORKERS_MAX, SharedTable, owner_id

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
    load: EngineLoad | None = None  # the engine's last report; None: none read
    load_age_s: float = 0.0  # how old that report was when the snapshot was taken

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


class ColdStartTimeout(Exception):
    """A model scaled to zero had no replica up within the cold-start bound."""

    def __init__(self, model: str, waited_s: float) -> None:
        super().__init__(model)
        self.model = model
        self.waited_s = waited_s


class LocalCounts:
    """Requests in flight per replica, for one gateway process."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def total(self, replica_id: str) -> int:
        return self._counts.get(replica_id, 0)

    def try_acquire(self, replica_id: str, capacity: int | None) -> bool:
        held = self._counts.get(replica_id, 0)
        if capacity is not None and held >= capacity:
            return False
        self._counts[replica_id] = held + 1
        return True

    def release(self, replica_id: str) -> None:
        left = self._counts.get(replica_id, 1) - 1
        if left > 0:
            self._counts[replica_id] = left
        else:
            self._counts.pop(replica_id, None)

    # Requests waiting in line for a model: the same counts, under another name.
    def try_wait(self, model: str, bound: int) -> bool:
        return self.try_acquire("\0wait:" + model, bound)

    def done_waiting(self, model: str) -> None:
        self.release("\0wait:" + model)

    def waiting(self, model: str) -> int:
        return self.total("\0wait:" + model)


_COUNTS = struct.Struct(f"<q{WORKERS_MAX}i")


class SharedCounts:
    """Requests in flight per replica across every gateway worker on the host: the
    capacity check and the increment are one locked step, so N workers together keep a
    replica at its max_num_seqs."""

    def __init__(self, table: SharedTable) -> None:
        self.table = table
        self.column = 1 + table.worker
        table.zero_column(self.column)
        # Looked up several times a request: the hash and the probe once per replica.
        self._offsets: dict[str, int] = {}

    def _offset(self, replica_id: str) -> int:
        offset = self._offsets.get(replica_id)
        if offset is None:
            offset = self._offsets[replica_id] = self.table.slot(
                owner_id(replica_id), [0] * WORKERS_MAX
            )
        return offset

    def total(self, replica_id: str) -> int:
        # Read without the lock: for choosing, a count a moment old is good enough.
        return int(sum(_COUNTS.unpack_from(self.table.map, self._offset(replica_id))[1:]))

    def try_acquire(self, replica_id: str, capacity: int | None) -> bool:
        offset = self._offset(replica_id)
        with self.table.locked(offset, _COUNTS.size):
            values = self.table.read(offset)
            if capacity is not None and sum(values[1:]) >= capacity:
                return False
            values[self.column] += 1
            self.table.write(offset, values)
        return True

    def release(self, replica_id: str) -> None:
        offset = self._offset(replica_id)
        with self.table.locked(offset, _COUNTS.size):
            values = self.table.read(offset)
            values[self.column] = max(0, values[self.column] - 1)
            self.table.write(offset, values)

    # Requests waiting in line for a model, across workers: the bound holds for all.
    def try_wait(self, model: str, bound: int) -> bool:
        return self.try_acquire("\0wait:" + model, bound)

    def done_waiting(self, model: str) -> None:
        self.release("\0wait:" + model)

    def waiting(self, model: str) -> int:
        return self.total("\0wait:" + model)


def shared_record() -> struct.Struct:
    return _COUNTS


def shared_counts(path: Path, worker: int) -> SharedCounts:
    return SharedCounts(SharedTable(path, _COUNTS, 4096, worker))


class ReplicaTable:
    """Live replicas by model, with what only the gateway knows: requests in flight per
    replica (across every worker, with SharedCounts), replicas that just refused a
    connection, and requests waiting for room.

    A replica takes at most `capacity` requests at once (its plan's max_num_seqs): more
    would only queue inside the engine, where they cannot be routed elsewhere and hold
    memory. Beyond that, requests wait here in arrival order, at most `queue_per_replica`
    per healthy replica and at most `timeout_s` each; past either bound, `Overloaded`.
    A waiter is woken by a release in its own worker, and looks again every
    `RECHECK_S` for room another worker freed.

    A model that may scale to zero (the supervisor's scaling state, in the snapshot) and
    has no replica holds its requests in `wait_warm` until one is up. The table keeps
    what the supervisor scales on (`activity`): when each model last had a request and
    how many requests wait here for it; the source sends it with every refresh, and at
    once when a request starts waiting for a cold model (`on_cold`).
    """

    RECHECK_S = 0.05

    def __init__(
        self,
        counts: LocalCounts | SharedCounts | None = None,
        routing: GatewayRouting | None = None,
        seed: int | None = None,
    ) -> None:
        self.loaded = False
        self.models: tuple[str, ...] = ()
        self._by_model: dict[str, tuple[Replica, ...]] = {}
        self.counts = counts or LocalCounts()
        self.chooser = Chooser(routing or GatewayRouting(), seed)
        self._failed_until: dict[str, float] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scale: dict[str, ScaleState] = {}
        self._last_request: dict[str, float] = {}  # model -> time.monotonic()
        self._cold: dict[str, int] = {}  # model -> requests waiting for its first replica
        self._warm: dict[str, asyncio.Event] = {}  # set when a cold model has a replica
        self.on_cold: Callable[[], None] | None = None

    def replace(
        self,
        models: list[str],
        replicas: list[Replica],
        scale: dict[str, ScaleState] | None = None,
    ) -> None:
        """Swap in a new snapshot (callable from any thread: one reference assignment)."""
        by_model: dict[str, list[Replica]] = {m: [] for m in models}
        for replica in replicas:
            by_model.setdefault(replica.model, []).append(replica)
        self._by_model = {m: tuple(rs) for m, rs in by_model.items()}
        self.models = tuple(sorted(by_model))
        if scale is not None:
            self.scale = scale
        self.chooser.reported(replicas)
        self.loaded = True
        if self._loop is not None and (any(self._waiters.values()) or self._warm):
            # New replicas may have room: let waiters look again (on the loop's thread).
            self._loop.call_soon_threadsafe(self._wake_all)

    def knows(self, model: str) -> bool:
        return model in self._by_model

    def replicas(self, model: str) -> tuple[Replica, ...]:
        """Every replica of the model in the snapshot, failed or not."""
        return self._by_model.get(model, ())

    def healthy(self, model: str) -> list[Replica]:
        now = time.monotonic()
        return [
            r
            for r in self._by_model.get(model, ())
            if self._failed_until.get(r.replica_id, 0.0) <= now
        ]

    def in_flight(self, replica: Replica) -> int:
        return self.counts.total(replica.replica_id)

    def _take(
        self,
        model: str,
        exclude: frozenset[str],
        capacity: int | None,
        route: Route | None = None,
    ) -> Replica | None:
        """The chooser's pick among healthy replicas with room, acquired."""
        loads = [
            (self.counts.total(r.replica_id), r)
            for r in self.healthy(model)
            if r.replica_id not in exclude
        ]
        loads = [(n, r) for n, r in loads if capacity is None or n < capacity]
        if not loads:
            return None
        # Another worker may take the room first: try the others before giving up.
        counts = {r.replica_id: n for n, r in loads}
        for replica in self.chooser.order(loads, capacity, route, self.counts):
            if self.counts.try_acquire(replica.replica_id, capacity):
                self.chooser.sent(route, replica, counts[replica.replica_id] + 1)
                return replica
        return None

    async def admit(
        self,
        model: str,
        capacity: int | None,
        queue_per_replica: int,
        timeout_s: float,
        exclude: frozenset[str] = frozenset(),
        route: Route | None = None,
    ) -> Replica | None:
        """A replica with room, acquired; waits in line when all are full.

        None when the model has no healthy replica (not even a full one) to wait for.
        """
        self._loop = asyncio.get_running_loop()
        waiters = self._waiters.setdefault(model, deque())
        if not waiters:
            replica = self._take(model, exclude, capacity, route)
            if replica is not None:
                return replica
        healthy = [r for r in self.healthy(model) if r.replica_id not in exclude]
        if not healthy:
            return None
        if not self.counts.try_wait(model, queue_per_replica * len(healthy)):
            raise Overloaded(
                model,
                f"all {len(healthy)} replicas of '{model}' are busy and "
                f"{self.counts.waiting(model)} requests are already waiting",
            )
        try:
            return await self._wait(model, capacity, timeout_s, exclude, waiters, route)
        finally:
            self.counts.done_waiting(model)

    async def _wait(
        self,
        model: str,
        capacity: int | None,
        timeout_s: float,
        exclude: frozenset[str],
        waiters: deque[asyncio.Future[None]],
        route: Route | None = None,
    ) -> Replica | None:
        assert self._loop is not None
        deadline = time.monotonic() + timeout_s
        # One place in line, kept while waiting: the line is first come, first served. A
        # recheck (for room another worker freed) is the head's alone; a waiter woken
        # but beaten to the room goes back to the head.
        fut = self._loop.create_future()
        waiters.append(fut)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded(
                        model, f"no replica of '{model}' had room within {timeout_s:g} seconds"
                    )
                await asyncio.wait((fut,), timeout=min(left, self.RECHECK_S))
                woken = fut.done()
                if not woken and waiters[0] is not fut:
                    continue
                replica = self._take(model, exclude, capacity, route)
                if replica is not None:
                    if not woken:
                        waiters.remove(fut)
                    if waiters and self._take_possible(model, exclude, capacity):
                        self._wake(model)
                    return replica
                if not [r for r in self.healthy(model) if r.replica_id not in exclude]:
                    if not woken:
                        waiters.remove(fut)
                    return None
                if woken:
                    fut = self._loop.create_future()
                    waiters.appendleft(fut)
        except BaseException:
            if fut in waiters:
                waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self._wake(model)  # woken, but leaving (cancelled): pass it on
            raise

    def _take_possible(self, model: str, exclude: frozenset[str], capacity: int | None) -> bool:
        return any(
            capacity is None or self.counts.total(r.replica_id) < capacity
            for r in self.healthy(model)
            if r.replica_id not in exclude
        )

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
        for model, event in self._warm.items():
            if self._by_model.get(model):
                event.set()

    # Scale to zero: requests for a model with no replica wait for one.

    def note_request(self, model: str) -> None:
        """A request for the model arrived (the supervisor scales on when they do)."""
        self._last_request[model] = time.monotonic()

    def wakeable(self, model: str) -> bool:
        """The model may be at zero replicas, and a request brings one back."""
        state = self.scale.get(model)
        return state is not None and state.wakeable

    def cold(self, model: str) -> bool:
        """A request for the model would wait for its first replica to start."""
        return self.wakeable(model) and not self._by_model.get(model)

    async def wait_warm(self, model: str, timeout_s: float) -> float:
        """Wait until the model has a replica; the seconds waited. ColdStartTimeout past
        `timeout_s`. Many requests waiting together are one demand: the supervisor starts
        one replica for them (control/scaling.py)."""
        started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        event = self._warm.get(model)
        if event is None:
            event = self._warm[model] = asyncio.Event()
        self._cold[model] = self._cold.get(model, 0) + 1
        if self.on_cold is not None:
            self.on_cold()  # tell the supervisor now, not at the next refresh
        try:
            while self.cold(model):
                left = timeout_s - (time.monotonic() - started)
                if left <= 0:
                    raise ColdStartTimeout(model, time.monotonic() - started)
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=left)
        finally:
            self._cold[model] -= 1
            if not self._cold[model]:
                del self._cold[model]
                self._warm.pop(model, None)
        return time.monotonic() - started

    def activity(self) -> GatewayDemand:
        """What this worker reports: per model, requests held here and time since the
        last request (models with neither are left out)."""
        now = time.monotonic()
        models: dict[str, ModelActivity] = {}
        for model in set(self._last_request) | set(self._cold) | set(self._waiters):
            held = self._cold.get(model, 0) + len(self._waiters.get(model, ()))
            last = self._last_request.get(model)
            models[model] = ModelActivity(
                waiting=held, idle_s=None if last is None else round(now - last, 3)
            )
        return GatewayDemand(models=models)

    def waiting(self, model: str) -> int:
        return len(self._waiters.get(model, ()))

    def acquire(self, replica: Replica) -> None:
        self.counts.try_acquire(replica.replica_id, None)

    def release(self, replica: Replica) -> None:
        self.counts.release(replica.replica_id)
        if self._waiters.get(replica.model):
            self._wake(replica.model)

    def mark_failed(self, replica: Replica) -> None:
        self._failed_until[replica.replica_id] = time.monotonic() + FAILED_BACKOFF_S

    def healthy_counts(self) -> dict[str, int]:
        return {m: len(self.healthy(m)) for m in self.models}

    def ready(self) -> bool:
        """Every model has a healthy replica, or is scaled to zero and can be woken."""
        return self.loaded and all(
            count or self.cold(model) for model, count in self.healthy_counts().items()
        )


def replicas_from_snapshot(snapshot: RegistrySnapshot) -> list[Replica]:
    return [
        Replica(
            r.replica_id,
            r.model,
            r.url,
            r.engine_model,
            r.response_model,
            r.engine_key,
            r.load,
            r.age_s,
        )
        for r in snapshot.routable()
    ]


class StaticSource:
    """A fixed list of replicas (`--static-replica NAME=URL`): benchmarks, debugging.

    With `interval_s`, a thread reads each engine's `/metrics` as a replica would (the
    engines are taken to speak vLLM's metric names, as the fake engine does) and swaps
    in the list with their load, so load-aware routing works without Ray too."""

    def __init__(
        self, table: ReplicaTable, pairs: list[tuple[str, str]], interval_s: float | None = None
    ) -> None:
        self.table = table
        self.models = sorted({m for m, _ in pairs})
        self.replicas = [
            Replica(f"static-{i}", model, url.rstrip("/"), model, model)
            for i, (model, url) in enumerate(pairs)
        ]
        table.replace(self.models, self.replicas)
        self._stop = threading.Event()
        if interval_s:
            self.interval_s = interval_s
            threading.Thread(target=self._run, name="static-load", daemon=True).start()

    def _run(self) -> None:
        import dataclasses
        import urllib.request

        from appliance.engines.vllm import VllmEngine

        adapter = VllmEngine()
        while not self._stop.wait(self.interval_s):
            replicas = []
            for replica in self.replicas:
                try:
                    with urllib.request.urlopen(replica.url + "/metrics", timeout=2) as answer:
                        load = adapter.parse_load(answer.read().decode(errors="replace"))
                except (OSError, ValueError):
                    load = None  # not up, or no metrics page: routed on in-flight counts
                replicas.append(dataclasses.replace(replica, load=load))
            self.table.replace(self.models, replicas)

    def stop(self) -> None:
        self._stop.set()


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
        self._poked = threading.Event()
        table.on_cold = self.poke
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
        # This worker's name in the registry's demand table (one per process, per host).
        worker = f"{socket.gethostname()}:{os.getpid()}"
        while not self._stop.is_set():
            self._poked.clear()
            try:
                if handle is None:
                    handle = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
                # The scaling signal (control/registry.py): sent, not awaited.
                handle.demand.remote(worker, self.table.activity().model_dump(mode="json"))
                snapshot = RegistrySnapshot.model_validate(
                    ray.get(handle.snapshot.remote(self.stale_after_s), timeout=5)
                )
                self.table.replace(
                    snapshot.models, replicas_from_snapshot(snapshot), snapshot.scale
                )
            except Exception as exc:
                handle = None
                log.warning("replica registry not readable yet: %r", exc)
            self._poked.wait(self.interval_s)

    def poke(self) -> None:
        """Refresh now (a request started waiting for a model at zero replicas)."""
        self._poked.set()

    def stop(self) -> None:
        self._stop.set()
        self._poked.set()
