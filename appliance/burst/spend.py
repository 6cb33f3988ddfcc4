"""Monthly cloud spend against the caps: for all keys together and for each key.

What was spent is what the usage ledger holds (`usage.cost` of rows with an
`upstream`, in `state.db`), read with `State.cloud_spend` since the first of the
month (UTC) by `refresh`. A request about to go out *holds* its worst case first (its
prompt tokens at the input price plus its max_tokens at the output price), so
concurrent requests cannot together pass a cap; when it ends, `settle` swaps the hold
for the real cost, and that cost stays held for `lag_s` more (the ledger's spool
takes about a second to reach state.db): counted twice for a moment rather than not at
all, so the error is on the side of stopping early. A cap is a ceiling: a request
whose worst case would cross it does not go.

The holds live in a `HoldStore`: `LocalHolds` for one process, or `SharedHolds`
(a `SharedTable`, gateway/shared.py) so that every gateway worker on the host checks
and holds against the same sums, one locked step each. A worker that dies takes its
column with it: the worker started in its place zeroes it, and the dead worker's
settled costs reach the ledger from its spool.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from appliance.burst.settings import PolicyConfig
from appliance.gateway.shared import WORKERS_MAX, SharedTable, owner_id

# Holds are summed in integer nano-units of the currency: adding and taking away floats
# drifts (1e-18 left over after a thousand holds), and an empty book must read 0.
_UNIT = 1e9

# The answer to "may this much be held": None, or why not.
Fits = Callable[[int, int], str | None]


def _units(amount: float) -> int:
    return round(amount * _UNIT)


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp()


class HoldStore(Protocol):
    """Units held, in all and per key. `take` checks and adds in one step."""

    def take(self, key: str, units: int, fits: Fits) -> str | None:
        """Add `units` for `key` unless `fits(held in all, held by key)` says why not."""

    def give(self, key: str, units: int) -> None: ...

    def held(self, key: str | None = None) -> int: ...


class LocalHolds:
    """Holds of this process alone."""

    def __init__(self) -> None:
        self._all = 0
        self._per_key: dict[str, int] = {}

    def take(self, key: str, units: int, fits: Fits) -> str | None:
        why = fits(self._all, self._per_key.get(key, 0))
        if why is None:
            self._all += units
            self._per_key[key] = self._per_key.get(key, 0) + units
        return why

    def give(self, key: str, units: int) -> None:
        self._all -= units
        left = self._per_key.get(key, 0) - units
        if left:
            self._per_key[key] = left
        else:
            self._per_key.pop(key, None)

    def held(self, key: str | None = None) -> int:
        return self._all if key is None else self._per_key.get(key, 0)


# owner id, units held per worker
_HOLDS = struct.Struct(f"<q{WORKERS_MAX}q")
_ALL = owner_id("\0all keys")


class SharedHolds:
    """Holds of every gateway worker on the host, in a shared table: a slot for all keys
    and one per key, a column per worker. Every change takes the all-keys slot's lock,
    which makes check-and-hold one step across workers."""

    SLOTS = 4096

    def __init__(self, path: Path, worker: int) -> None:
        self.table = SharedTable(path, _HOLDS, self.SLOTS, worker)
        self.column = 1 + worker
        self.table.zero_column(self.column)
        self._all = self.table.slot(_ALL, [0] * WORKERS_MAX)

    def close(self) -> None:
        self.table.close()

    def _sum(self, offset: int) -> int:
        return int(sum(_HOLDS.unpack_from(self.table.map, offset)[1:]))

    def _add(self, offset: int, units: int) -> None:
        values = _HOLDS.unpack_from(self.table.map, offset)
        column = values[self.column] + units
        struct.pack_into("<q", self.table.map, offset + 8 * self.column, column)

    def take(self, key: str, units: int, fits: Fits) -> str | None:
        slot = self.table.slot(owner_id(key), [0] * WORKERS_MAX)
        with self.table.locked(self._all, _HOLDS.size):
            why = fits(self._sum(self._all), self._sum(slot))
            if why is None:
                self._add(self._all, units)
                self._add(slot, units)
        return why

    def give(self, key: str, units: int) -> None:
        slot = self.table.slot(owner_id(key), [0] * WORKERS_MAX)
        with self.table.locked(self._all, _HOLDS.size):
            self._add(self._all, -units)
            self._add(slot, -units)

    def held(self, key: str | None = None) -> int:
        if key is None:
            return self._sum(self._all)
        return self._sum(self.table.slot(owner_id(key), [0] * WORKERS_MAX))


@dataclass
class Hold:
    key: str
    amount: float
    month: float
    settled: bool = False


class SpendBook:
    def __init__(
        self,
        policy: PolicyConfig,
        clock: Callable[[], float] = time.time,
        lag_s: float = 5.0,
        holds: HoldStore | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.lag_s = lag_s
        self.holds: HoldStore = holds or LocalHolds()
        self.month = month_start(clock())
        self.total = 0.0  # this month, as the ledger last said
        self.per_key: dict[str, float] = {}
        self._in_flight = 0  # this process's unsettled holds
        # Settled costs still held until the ledger has them: (release at, key, units).
        self._settled: deque[tuple[float, str, int]] = deque()

    @property
    def held(self) -> float:
        """Worst cases held by this process's requests in flight."""
        return self._in_flight / _UNIT

    def cap_of(self, key: str) -> float | None:
        return self.policy.key_caps.get(key, self.policy.key_monthly_cap)

    def _roll(self) -> None:
        now = self.clock()
        month = month_start(now)
        if month != self.month:
            self.month, self.total, self.per_key = month, 0.0, {}
            while self._settled:  # last month's costs: not this month's to count
                _, key, units = self._settled.popleft()
                self.holds.give(key, units)
        while self._settled and self._settled[0][0] <= now:
            _, key, units = self._settled.popleft()
            self.holds.give(key, units)

    def refresh(self, total: float, per_key: dict[str, float]) -> None:
        """The ledger's sums for this month (State.cloud_spend(book.month))."""
        self._roll()
        self.total, self.per_key = total, dict(per_key)

    def spent(self, key: str | None = None) -> float:
        """This month: the ledger's sum, plus what is held (in flight and just settled)."""
        self._roll()
        ledger = self.total if key is None else self.per_key.get(key, 0.0)
        return ledger + self.holds.held(key) / _UNIT

    def hold(self, key: str, worst_case: float) -> Hold | str:
        """A hold for one request, or why it may not go (the cap it would cross)."""
        self._roll()
        cap = self.policy.monthly_cap
        key_cap = self.cap_of(key)
        units = _units(worst_case)
        total, mine = self.total, self.per_key.get(key, 0.0)

        def fits(held: int, held_by_key: int) -> str | None:
            if total + (held + units) / _UNIT > cap:
                return f"the monthly cloud spend cap ({cap:g}) would be crossed"
            if key_cap is not None and mine + (held_by_key + units) / _UNIT > key_cap:
                return f"the key's monthly cloud spend cap ({key_cap:g}) would be crossed"
            return None

        why = self.holds.take(key, units, fits)
        if why is not None:
            return why
        self._in_flight += units
        return Hold(key, units / _UNIT, self.month)

    def settle(self, hold: Hold, cost: float) -> None:
        """The request ended and cost `cost` (0 when it failed before any token)."""
        if hold.settled:
            return
        hold.settled = True
        units = _units(hold.amount)
        self._in_flight -= units
        now = self.clock()
        kept = _units(cost) if hold.month == month_start(now) and cost > 0 else 0
        # What it really cost stays held until the ledger has its row.
        self.holds.give(hold.key, units - kept)
        if kept:
            self._settled.append((now + self.lag_s, hold.key, kept))
