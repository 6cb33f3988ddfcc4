"""Which replica of a model takes a request: engine load, this host's requests in flight,
and prefix affinity ([gateway.routing], docs/scaling.md).

A replica's load is a fraction of its capacity (max_num_seqs):

    (in flight from this host + reported beyond it) / capacity + kv_weight * KV-cache use

"In flight from this host" is the gateway's own count, across its workers (SharedCounts),
always current. "Reported beyond it" is what the engine last said it runs and queues
(running + waiting) less the most this host had in flight to it over the last two
snapshots: the load other gateways, or clients that bypass the gateway, put on it. (Less
the count at arrival alone would not do: a burst that just finished would still show in
the report, a second old, as load of someone else's.) An engine's report older than
`load_max_age_s` is dropped, and the replica's load is this host's count alone, so a
replica that stops reporting is neither shunned nor flooded on the strength of an old
figure.

Policies: `least_outstanding` ranks by this host's count alone (ties in turn). `load`
draws `load_choices` replicas at random and takes the least loaded (power of two
choices). `prefix` first asks the prefix index for the replicas last sent the request's
longest known prefix (or its session); the least loaded of them takes it unless its load
is more than `spill_margin` above the least loaded replica's, and otherwise the request
spills to the `load` choice. A session no worker has seen goes to its rendezvous home
(prefix.home), so every worker and gateway host sends a new session to the same replica.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from appliance.config import GatewayRouting
from appliance.gateway.prefix import PrefixIndex, Route, home, prompt_bytes, route_for

if TYPE_CHECKING:
    from appliance.gateway.replicas import Replica

# Static replicas (`--static-replica`) have no plan: loads are scaled as for the CPU
# engine's default max_num_seqs.
UNKNOWN_CAPACITY = 8


class Counts(Protocol):
    def total(self, replica_id: str) -> int: ...


@dataclass(frozen=True, slots=True)
class _Report:
    external: float  # requests the engine had beyond this host's own in flight
    kv: float  # KV-cache use, 0 to 1 (0 when the engine reports none)
    at: float  # time.monotonic() of the engine's report


class Chooser:
    """Orders a model's replicas with room for one request; learns where requests went."""

    def __init__(self, settings: GatewayRouting, seed: int | None = None) -> None:
        self.settings = settings
        self.index = PrefixIndex(settings.index_entries) if settings.policy == "prefix" else None
        self._reports: dict[str, _Report] = {}
        self._pending: tuple[float, tuple[Replica, ...]] | None = None
        self._random = random.Random(seed)
        self._turn = itertools.count()
        # The most in flight seen per replica since the last snapshot, and in the one before.
        self._peaks: dict[str, int] = {}
        self._peaks_before: dict[str, int] = {}
        # How requests were placed: affinity, session_home, spill (to the load choice) or
        # load (no prefix known); and who else wants to know (the gateway's metrics).
        self.decisions: Counter[str] = Counter()
        self.on_decision: Callable[[str, str], None] | None = None

    def reported(self, replicas: Sequence[Replica]) -> None:
        """A new snapshot with the engines' load reports (from any thread: the counts are
        read on the loop's thread, at the next choice)."""
        self._pending = (time.monotonic(), tuple(r for r in replicas if r.load is not None))

    def _fold(self, counts: Counts) -> dict[str, _Report]:
        pending = self._pending
        if pending is not None:
            self._pending = None
            at, replicas = pending
            peaks, before = self._peaks, self._peaks_before
            reports = {}
            for r in replicas:
                assert r.load is not None
                rid = r.replica_id
                own = max(counts.total(rid), peaks.get(rid, 0), before.get(rid, 0))
                external = max(0.0, r.load.running + r.load.waiting - own)
                reports[r.replica_id] = _Report(
                    external, r.load.kv_cache_usage or 0.0, at - r.load_age_s
                )
            self._reports = reports
            self._peaks_before, self._peaks = peaks, {}
        return self._reports

    def route(
        self,
        model: str,
        messages: list[dict[str, Any]] | None,
        prompts: Sequence[str | list[int]] | None,
        session: str | None,
    ) -> Route | None:
        """The request's prefix keys, when the policy uses them."""
        if self.index is None:
            return None
        s = self.settings
        data = prompt_bytes(messages, prompts)
        return route_for(model, data, session, s.block_chars, s.max_blocks)

    def loads(
        self, candidates: Sequence[tuple[int, Replica]], capacity: int | None, counts: Counts
    ) -> list[tuple[float, Replica]]:
        """Each candidate's load (see the module docstring), from its count in flight."""
        if self.settings.policy == "least_outstanding":
            return [(float(n), r) for n, r in candidates]
        reports = self._fold(counts)
        scale = capacity or UNKNOWN_CAPACITY
        oldest = time.monotonic() - self.settings.load_max_age_s
        kv_weight = self.settings.kv_weight
        scored = []
        for n, r in candidates:
            report = reports.get(r.replica_id)
            if report is None or report.at < oldest:
                scored.append((n / scale, r))
            else:
                scored.append(((n + report.external) / scale + kv_weight * report.kv, r))
        return scored

    def order(
        self,
        candidates: Sequence[tuple[int, Replica]],
        capacity: int | None,
        route: Route | None,
        counts: Counts,
    ) -> list[Replica]:
        """The candidates (count in flight, replica; each with room) in the order to try:
        the choice first, then the rest by load (another worker may fill the choice first)."""
        scored = self.loads(candidates, capacity, counts)
        least = min(load for load, _ in scored)
        chosen, kind = None, "load"
        if route is not None and self.index is not None:
            chosen, kind = self._affine(scored, least, route)
        if chosen is None:
            chosen = self._by_load(scored)
        self.decisions[kind] += 1
        if self.on_decision is not None:
            self.on_decision(chosen.model, kind)
        rest = sorted((p for p in scored if p[1] is not chosen), key=lambda p: p[0])
        return [chosen, *(r for _, r in rest)]

    def _affine(
        self, scored: list[tuple[float, Replica]], least: float, route: Route
    ) -> tuple[Replica | None, str]:
        """The replica holding the request's prefix or session, if within the margin."""
        assert self.index is not None
        by_id = {r.replica_id: (load, r) for load, r in scored}
        _, holders = self.index.lookup(route)
        held = [by_id[h] for h in holders if h in by_id]
        if held:
            pick, kind = min(held, key=lambda p: p[0]), "affinity"
        elif route.session is not None:
            pick, kind = by_id[home(route.session, list(by_id))], "session_home"
        else:
            return None, "load"
        if pick[0] > least + self.settings.spill_margin:
            return None, "spill"
        return pick[1], kind

    def _by_load(self, scored: list[tuple[float, Replica]]) -> Replica:
        pool = scored
        choices = self.settings.load_choices
        if self.settings.policy != "least_outstanding" and 0 < choices < len(scored):
            pool = self._random.sample(scored, choices)
        best = min(load for load, _ in pool)
        tied = [r for load, r in pool if load == best]
        return tied[next(self._turn) % len(tied)]

    def sent(self, route: Route | None, replica: Replica, in_flight: int) -> None:
        """The request was given to `replica`, which now has `in_flight` from this host:
        remember that, and that it holds the request's prefix."""
        if in_flight > self._peaks.get(replica.replica_id, 0):
            self._peaks[replica.replica_id] = in_flight
        if route is not None and self.index is not None:
            self.index.record(route, replica.replica_id)
