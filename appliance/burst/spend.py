"""Monthly cloud spend against the caps: for all keys together and for each key.

What was spent is what the usage ledger holds (`usage.cost` of rows with an
`upstream`, in `state.db`), read with `State.cloud_spend` since the first of the
month (UTC) by `refresh`. A request about to go out *holds* its worst case first (its
prompt tokens at the input price plus its max_tokens at the output price), so
concurrent requests cannot together pass a cap; when it ends, `settle` swaps the hold
for the real cost, which counts until the next `refresh` finds its row in the ledger.
A settled cost also counts on its own for `lag_s` after it settled (the ledger's spool
takes about a second to reach state.db): counted twice for a moment rather than not at
all, so the error is on the side of stopping early. A cap is a ceiling: a request
whose worst case would cross it does not go.

Per process. Gateway workers each hold their own requests; the integration puts the
holds in the shared table (gateway/shared.py) so that they hold across workers too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.burst.settings import PolicyConfig

# Holds are summed in integer nano-units of the currency: adding and taking away floats
# drifts (1e-18 left over after a thousand holds), and an empty book must read 0.
_UNIT = 1e9


def _units(amount: float) -> int:
    return round(amount * _UNIT)


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp()


@dataclass
class Hold:
    key: str
    amount: float
    month: float
    settled: bool = False


class SpendBook:
    def __init__(
        self, policy: PolicyConfig, clock: Callable[[], float] = time.time, lag_s: float = 5.0
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.lag_s = lag_s
        self.month = month_start(clock())
        self.total = 0.0  # this month, as the ledger last said
        self.per_key: dict[str, float] = {}
        self._held = 0
        self._held_per_key: dict[str, int] = {}
        self.recent: list[tuple[float, str, float]] = []  # (settled at, key, cost)

    @property
    def held(self) -> float:
        """Worst cases held by requests in flight."""
        return self._held / _UNIT

    def cap_of(self, key: str) -> float | None:
        return self.policy.key_caps.get(key, self.policy.key_monthly_cap)

    def _roll(self) -> None:
        now = self.clock()
        month = month_start(now)
        if month != self.month:
            self.month, self.total, self.per_key, self.recent = month, 0.0, {}, []
        while self.recent and now - self.recent[0][0] > self.lag_s:
            self.recent.pop(0)

    def refresh(self, total: float, per_key: dict[str, float]) -> None:
        """The ledger's sums for this month (State.cloud_spend(book.month))."""
        self._roll()
        self.total, self.per_key = total, dict(per_key)

    def spent(self, key: str | None = None) -> float:
        self._roll()
        if key is None:
            return self.total + self.held + sum(cost for _, _, cost in self.recent)
        recent = sum(cost for _, k, cost in self.recent if k == key)
        return self.per_key.get(key, 0.0) + self._held_per_key.get(key, 0) / _UNIT + recent

    def hold(self, key: str, worst_case: float) -> Hold | str:
        """A hold for one request, or why it may not go (the cap it would cross)."""
        self._roll()
        cap = self.policy.monthly_cap
        if self.spent() + worst_case > cap:
            return f"the monthly cloud spend cap ({cap:g}) would be crossed"
        key_cap = self.cap_of(key)
        if key_cap is not None and self.spent(key) + worst_case > key_cap:
            return f"the key's monthly cloud spend cap ({key_cap:g}) would be crossed"
        units = _units(worst_case)
        self._held += units
        self._held_per_key[key] = self._held_per_key.get(key, 0) + units
        return Hold(key, units / _UNIT, self.month)

    def settle(self, hold: Hold, cost: float) -> None:
        """The request ended and cost `cost` (0 when it failed before any token)."""
        if hold.settled:
            return
        hold.settled = True
        units = _units(hold.amount)
        self._held -= units
        self._held_per_key[hold.key] -= units
        if not self._held_per_key[hold.key]:
            del self._held_per_key[hold.key]
        now = self.clock()
        if hold.month == month_start(now) and cost > 0:
            self.recent.append((now, hold.key, cost))
