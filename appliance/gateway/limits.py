"""Per-key limits that hold across every gateway process on this host.

Requests per minute and tokens per minute are token buckets (a bucket holds a minute's
worth and refills continuously); requests in flight are counted. Prompt tokens are taken
from the tokens bucket at admission, completion tokens when the engine reports them, so a
long answer makes the key's next requests wait rather than failing the answer.

The state is a `SharedTable` (shared.py), a slot per key: N gateway processes admit
against one set of buckets, at the cost of a lock and unlock per request. In-flight counts
are kept per worker: a worker that dies takes its count with it, because the worker
started in its place zeroes that column first.

A request over a limit is 429 with Retry-After and OpenAI's x-ratelimit-* headers; every
admitted request carries those headers too.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.gateway.errors import GatewayError
from appliance.gateway.shared import WORKERS_MAX, SharedTable
from appliance.keys import KeyRecord

SLOTS = 4096
# key id, rpm tokens, rpm refilled at, tpm tokens, tpm refilled at, in flight per worker
_SLOT = struct.Struct(f"<q4d{WORKERS_MAX}i")
# A new slot: tokens -1 at time 0 mean "a full bucket" (see _refill).
_FRESH = (-1.0, 0.0, -1.0, 0.0) + (0,) * WORKERS_MAX


def _duration(seconds: float) -> str:
    """OpenAI's way of writing a reset time: 120ms, 6s, 1m30s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass(frozen=True)
class Grant:
    """An admitted request: what to release, and the headers to answer with."""

    key_id: int
    headers: dict[str, str]


def limited(key: KeyRecord) -> bool:
    p = key.policy
    return p.rpm is not None or p.tpm is not None or p.concurrency is not None


class SharedLimits:
    def __init__(self, path: Path, worker: int = 0) -> None:
        self.table = SharedTable(path, _SLOT, SLOTS, worker)
        self.worker = worker
        self.table.zero_column(5 + worker)

    def close(self) -> None:
        self.table.close()

    def _slot(self, key_id: int) -> int:
        return self.table.slot(key_id, _FRESH)

    @staticmethod
    def _refill(tokens: float, at: float, capacity: int, now: float) -> float:
        if tokens < 0 and at == 0.0:  # a new slot: a full bucket
            return float(capacity)
        return min(float(capacity), tokens + (now - at) * capacity / 60.0)

    def admit(self, key: KeyRecord, prompt_tokens: int | None) -> Grant:
        """Take one request (and its prompt tokens) from the key's buckets, or 429."""
        policy = key.policy
        need = prompt_tokens or 0
        if policy.tpm is not None and need > policy.tpm:
            raise GatewayError(
                400,
                f"This request's prompt has {need} tokens, more than the key '{key.name}' "
                f"may use in a minute ({policy.tpm}); it can never be admitted.",
                code="key_limit_exceeded",
            )
        offset = self._slot(key.id)
        now = time.monotonic()
        with self.table.locked(offset, _SLOT.size):
            values = self.table.read(offset)
            rpm_tokens = tpm_tokens = 0.0
            if policy.rpm is not None:
                rpm_tokens = self._refill(values[1], values[2], policy.rpm, now)
                values[1], values[2] = rpm_tokens, now
            if policy.tpm is not None:
                tpm_tokens = self._refill(values[3], values[4], policy.tpm, now)
                values[3], values[4] = tpm_tokens, now
            in_flight = int(sum(values[5:]))
            refusal: GatewayError | None = None
            if policy.concurrency is not None and in_flight >= policy.concurrency:
                refusal = _too_many(
                    f"The key '{key.name}' has {in_flight} requests in flight, its limit; "
                    "retry when one finishes.",
                    "requests",
                    "concurrency_limit_exceeded",
                    1.0,
                )
            elif policy.rpm is not None and rpm_tokens < 1:
                wait = (1 - rpm_tokens) * 60.0 / policy.rpm
                refusal = _too_many(
                    f"The key '{key.name}' reached its limit of {policy.rpm} requests per "
                    f"minute; retry in {_duration(wait)}.",
                    "requests",
                    "rate_limit_exceeded",
                    wait,
                )
            elif policy.tpm is not None and tpm_tokens < max(need, 1):
                wait = (max(need, 1) - tpm_tokens) * 60.0 / policy.tpm
                refusal = _too_many(
                    f"The key '{key.name}' reached its limit of {policy.tpm} tokens per "
                    f"minute; retry in {_duration(wait)}.",
                    "tokens",
                    "rate_limit_exceeded",
                    wait,
                )
            if refusal is None:
                values[1] -= 1 if policy.rpm is not None else 0
                values[3] -= need if policy.tpm is not None else 0
                values[5 + self.worker] += 1
            self.table.write(offset, values)
        headers = self._headers(key, values, now)
        if refusal is not None:
            refusal.headers.update(headers)
            raise refusal
        return Grant(key.id, headers)

    def _headers(self, key: KeyRecord, values: list[float], now: float) -> dict[str, str]:
        policy, out = key.policy, {}
        for kind, limit, tokens in (
            ("requests", policy.rpm, values[1]),
            ("tokens", policy.tpm, values[3]),
        ):
            if limit is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(tokens)))
            out[f"x-ratelimit-reset-{kind}"] = _duration((limit - tokens) * 60.0 / limit)
        return out

    def settle(self, key: KeyRecord, completion_tokens: int) -> None:
        """Take the answer's tokens from the tokens bucket (it may go below zero)."""
        if key.policy.tpm is None or completion_tokens <= 0:
            return
        offset = self._slot(key.id)
        now = time.monotonic()
        with self.table.locked(offset, _SLOT.size):
            values = self.table.read(offset)
            values[3] = self._refill(values[3], values[4], key.policy.tpm, now) - completion_tokens
            values[4] = now
            self.table.write(offset, values)

    def release(self, grant: Grant) -> None:
        offset = self._slot(grant.key_id)
        with self.table.locked(offset, _SLOT.size):
            values = self.table.read(offset)
            values[5 + self.worker] = max(0, values[5 + self.worker] - 1)
            self.table.write(offset, values)


def _too_many(message: str, kind: str, code: str, wait_s: float) -> GatewayError:
    # OpenAI's 429s name what ran out in `type`: requests or tokens.
    return GatewayError(
        429,
        message,
        type=kind,
        code=code,
        headers={
            "retry-after": str(max(1, math.ceil(wait_s))),
            "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
        },
    )
