"""Cloud overflow at the gateway: when a request leaves the site, and what is told about it.

The gateway holds one `Overflow` when `[burst] enabled = true` (None otherwise: the
request path then pays one attribute test). For a chat request to a model some provider
maps, it answers three questions, in this order:

1. **Is there a trigger?** (`trigger`, before the request joins the local line)
   - `local_unavailable`: the model has no healthy local replica;
   - `latency`: every local slot of the model (max_num_seqs per healthy replica) is
     taken, or requests are already waiting for one, and the estimated wait,
     `(requests in line + 1) x (wait per place) + recent local time to first token`,
     is above `latency_target_ms`. The recent times are EWMAs of this worker's local
     answers: the time to first token from acquiring a replica, and the wait per
     place, each waiting request's time in line divided by the places ahead of it plus
     one, planned as its mean plus twice its mean deviation (until a request has
     waited: the request time divided by the slots). Until the first local answer
     there is no estimate and this trigger does not fire;
   - `images`: the request carries image parts, the local model's catalog entry reads
     text only, and a provider's model reads images (`images = true`): it can run
     nowhere else.
   After the local attempt (`after_local`): `local_full` (the line was full or its wait
   ran out: 503 model_overloaded), `local_unavailable` (the 503 model_unavailable) and,
   with `local_errors`, `local_error` (the engine failed before answering: 502).
2. **May it leave?** (`refusal`, then `take_share`): the key's data class and opt-in
   (`Burst.refusal`; `restricted` never leaves, whatever the configuration), then
   `max_share`: at most that share of the model's recent requests (a count that decays
   with a one-minute time constant, all gateway workers together) may overflow.
3. **Can a provider take it?** `Burst` picks one within the spend caps, whose holds
   are shared by every worker (`SharedHolds`); the ledger's monthly sums are read
   every `refresh_s` in a thread, never on the request path.

A request that may not leave, or that no provider could take, goes on locally: it
waits in line or gets the local 429/503, exactly as without overflow. Every decision
is written to the audit log (`cloud overflow` naming every provider the request
reached, `cloud overflow refused` with the reason), counted in the metrics, and told
to the client in `x-appliance-upstream`: `local`, `local; overflow_refused=<why>`, or
`<provider>; reason=<trigger>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.burst import Burst, Refusal
from appliance.gateway.replicas import ReplicaTable
from appliance.gateway.shared import WORKERS_MAX, SharedTable, owner_id
from appliance.keys import KeyRecord

log = logging.getLogger("appliance.gateway")

# The share of overflowed requests is over a count that decays with this time constant.
SHARE_TAU_S = 60.0
# Weight of the newest local answer in the recent local times.
PACE_ALPHA = 0.2
# Local failures that may overflow afterwards: the error code -> the trigger it is.
AFTER_LOCAL = {
    "model_overloaded": "local_full",
    "model_unavailable": "local_unavailable",
    "engine_error": "local_error",
}

SpendSource = Callable[[float], tuple[float, dict[str, float]]]

# owner id, then per worker: requests, overflowed requests, when last counted (monotonic)
_SHARES = struct.Struct(f"<q{3 * WORKERS_MAX}d")


class Shares:
    """Per model, decaying counts of requests and of overflowed ones: this worker's in a
    column of its own (it alone writes there, so no lock), summed over every worker's."""

    def __init__(self, table: SharedTable | None) -> None:
        self.table = table
        self._mine: dict[str, list[float]] = {}
        self._offsets: dict[str, int] = {}
        if table is not None:
            table.zero_column(1 + 3 * table.worker)
            table.zero_column(2 + 3 * table.worker)

    @staticmethod
    def _decayed(value: float, at: float, now: float) -> float:
        return value * math.exp(-(now - at) / SHARE_TAU_S) if at else 0.0

    def count(self, model: str, overflowed: bool = False) -> None:
        now = time.monotonic()
        mine = self._mine.get(model)
        if mine is None:
            mine = self._mine[model] = [0.0, 0.0, now]
        factor = math.exp(-(now - mine[2]) / SHARE_TAU_S)
        if overflowed:  # the request was already counted: only its overflow is new
            mine[0], mine[1] = mine[0] * factor, mine[1] * factor + 1
        else:
            mine[0], mine[1] = mine[0] * factor + 1, mine[1] * factor
        mine[2] = now
        if self.table is not None:
            offset = self._offsets.get(model)
            if offset is None:
                fresh = [0.0] * (3 * WORKERS_MAX)
                offset = self._offsets[model] = self.table.slot(owner_id(model), fresh)
            column = offset + 8 + 24 * self.table.worker
            struct.pack_into("<3d", self.table.map, column, *mine)

    def share(self, model: str) -> tuple[float, float]:
        """(requests, overflowed) of the model, decayed to now, every worker together."""
        now = time.monotonic()
        if self.table is None or model not in self._offsets:
            mine = self._mine.get(model, [0.0, 0.0, 0.0])
            return self._decayed(mine[0], mine[2], now), self._decayed(mine[1], mine[2], now)
        values = _SHARES.unpack_from(self.table.map, self._offsets[model])[1:]
        total = over = 0.0
        for w in range(WORKERS_MAX):
            requests, overflowed, at = values[3 * w : 3 * w + 3]
            total += self._decayed(requests, at, now)
            over += self._decayed(overflowed, at, now)
        return total, over

    def close(self) -> None:
        if self.table is not None:
            self.table.close()


def shares_at(path: Path, worker: int) -> Shares:
    return Shares(SharedTable(path, _SHARES, 1024, worker))


def _ewma(value: float | None, sample: float) -> float:
    return sample if value is None else value + PACE_ALPHA * (sample - value)


class _Pace:
    """Recent local times of one model: first token and whole answer from acquiring a
    replica, and the wait per place in line (None until a request has waited)."""

    __slots__ = ("duration_s", "place_dev_s", "place_s", "ttft_s")

    def __init__(self, ttft_s: float, duration_s: float) -> None:
        self.ttft_s = ttft_s
        self.duration_s = duration_s
        self.place_s: float | None = None
        self.place_dev_s = 0.0  # its mean deviation

    def place(self, slots: int) -> float:
        """The wait per place to plan with: the mean plus twice its deviation (as TCP
        sets its retransmission timeout), so that the slow tail, not the middle, keeps
        within the target. Slots free in batches, so waits vary around the mean."""
        if self.place_s is None:
            return self.duration_s / slots
        return self.place_s + 2 * self.place_dev_s


class Overflow:
    def __init__(
        self,
        burst: Burst,
        table: ReplicaTable,
        spend: SpendSource | None = None,
        shares: Shares | None = None,
        refresh_s: float = 5.0,
        on_status: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    ) -> None:
        self.burst = burst
        self.table = table
        self.triggers = burst.config.triggers
        self.policy = burst.config.policy
        self.spend_source = spend
        self.shares = shares or Shares(None)
        self.refresh_s = refresh_s
        self.on_status = on_status or (lambda status: None)
        self._serves: dict[str, bool] = {}
        self._images: dict[str, bool] = {}
        self._pace: dict[str, _Pace] = {}
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.burst.start()
        # The first read of the month's spend is awaited: a restarted gateway must not
        # start from nothing and overspend.
        await self.refresh()
        self._refreshing = asyncio.ensure_future(self._refresh_loop())

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        await self.burst.close()
        self.shares.close()

    async def refresh(self) -> None:
        """The ledger's spend this month, read in a thread; the providers' state to the
        metrics. Never raises: a locked state file keeps the last sums."""
        if self.spend_source is not None:
            try:
                total, per_key = await asyncio.to_thread(self.spend_source, self.burst.spend.month)
            except Exception as exc:
                log.warning("cloud spend not readable from the ledger: %r", exc)
            else:
                self.burst.refresh_spend(total, per_key)
        self.on_status(self.burst.status())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    # The request path.

    def serves(self, model: str) -> bool:
        found = self._serves.get(model)
        if found is None:
            found = self._serves[model] = self.burst.serves(model)
        return found

    def reads_images(self, model: str) -> bool:
        found = self._images.get(model)
        if found is None:
            found = self._images[model] = self.burst.reads_images(model)
        return found

    def trigger(self, model: str, capacity: int | None) -> str | None:
        """Why this request should overflow before it joins the local line, or None."""
        healthy = self.table.healthy(model)
        if not healthy:
            return "local_unavailable" if self.triggers.local_unavailable else None
        target = self.triggers.latency_target_ms
        pace = self._pace.get(model)
        if target is None or capacity is None or pace is None:
            return None
        slots = capacity * len(healthy)
        waiting = self.table.counts.waiting(model)
        # A slot free for a moment while others wait is theirs: the newcomer joins the line.
        if not waiting and sum(self.table.in_flight(r) for r in healthy) < slots:
            return None
        wait_s = (waiting + 1) * pace.place(slots) + pace.ttft_s
        return "latency" if wait_s * 1000 > target else None

    def after_local(self, code: str | None) -> str | None:
        """The trigger a local failure (its error code) is, when it is one."""
        reason = AFTER_LOCAL.get(code or "")
        if reason == "local_full" and not self.triggers.local_full:
            return None
        if reason == "local_unavailable" and not self.triggers.local_unavailable:
            return None
        if reason == "local_error" and not self.triggers.local_errors:
            return None
        return reason

    def ahead(self, model: str, capacity: int | None) -> int | None:
        """Requests in the model's local line now (all workers), for a request about to
        join it; None when a slot is free (it will not wait)."""
        waiting = self.table.counts.waiting(model)
        if waiting or capacity is None:
            return waiting
        healthy = self.table.healthy(model)
        busy = sum(self.table.in_flight(r) for r in healthy)
        return 0 if busy >= capacity * len(healthy) else None

    def observe(
        self, model: str, ttft_s: float, duration_s: float, waited_s: float, ahead: int | None
    ) -> None:
        """A local answer's times from acquiring its replica; how long it waited for one
        with `ahead` requests in line before it (None: a slot was free)."""
        pace = self._pace.get(model)
        if pace is None:
            pace = self._pace[model] = _Pace(ttft_s, duration_s)
        else:
            pace.ttft_s = _ewma(pace.ttft_s, ttft_s)
            pace.duration_s = _ewma(pace.duration_s, duration_s)
        if ahead is not None:
            sample = waited_s / (ahead + 1)
            if pace.place_s is not None:
                pace.place_dev_s = _ewma(pace.place_dev_s, abs(sample - pace.place_s))
            pace.place_s = _ewma(pace.place_s, sample)

    def refusal(self, key: KeyRecord | None) -> Refusal | None:
        if key is None:
            return self.burst.refusal(None, "restricted")
        return self.burst.refusal(key.name, key.policy.data_class)

    def take_share(self, model: str) -> Refusal | None:
        """Count this request's overflow against max_share, or why it may not."""
        share = self.policy.max_share
        total, over = self.shares.share(model)
        # The slack: this request's own count has decayed a little since it arrived.
        if share < 1 and (over + 1) > share * total + 0.01:
            return Refusal(
                "max_share",
                f"{share:.0%} of the model's recent requests already overflowed (max_share)",
            )
        self.shares.count(model, overflowed=True)
        return None
