"""Each provider's circuit breaker and recent latency, and the order to try them in.

Breaker: *closed* (requests pass) until `errors` failures that count (5xx, 429,
timeouts, broken connections, refused credentials; never a 4xx about the request) fall
within `window_s`; then *open* (nothing passes) for `cooldown_s`; then *half-open*: one
probe request passes, and its outcome closes the breaker or opens it for another
cool-down. The clock is injectable so tests step through it without sleeping.

Latency: an EWMA of the time to the provider's first byte (the first event of a stream,
the whole answer otherwise), in seconds. Among providers whose breaker lets a request
pass, the fastest is tried first; one never measured is tried before any measured one
(so it gets measured), and ties keep the configured order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from appliance.burst.settings import BreakerConfig

Clock = Callable[[], float]
State = Literal["closed", "open", "half_open"]


class Breaker:
    def __init__(self, config: BreakerConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.failures: deque[float] = deque()
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.config.cooldown_s:
            return "half_open"
        return "open"

    def allows(self) -> bool:
        """Whether a request may go now (without taking the half-open probe)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    def acquire(self) -> bool:
        """Take the right to send one request: always when closed, once when half-open."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        """A request went well. Failures in the window still count (N in the window open
        it, successes in between or not); a probe that went well closes it."""
        if self.opened_at is not None:
            self.failures.clear()
            self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        now = self.clock()
        if self.opened_at is not None:
            # The probe failed (or a request sent before the breaker opened): another cool-down.
            self.opened_at = now
            self.probing = False
            return
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.config.window_s:
            self.failures.popleft()
        if len(self.failures) >= self.config.errors:
            self.opened_at = now
            self.failures.clear()

    def release(self) -> None:
        """The request ended without telling (cancelled by the client): free the probe."""
        self.probing = False


class Latency:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def observe(self, seconds: float) -> None:
        if self.value is None:
            self.value = seconds
        else:
            self.value += self.alpha * (seconds - self.value)


def order(names: Sequence[str], latency: dict[str, Latency]) -> list[str]:
    """Unmeasured first (in the given order), then the fastest first."""
    position = {name: i for i, name in enumerate(names)}

    def key(name: str) -> tuple[float, int]:
        value = latency[name].value
        return (-1.0 if value is None else value, position[name])

    return sorted(names, key=key)
