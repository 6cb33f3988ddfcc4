"""Who is calling: API keys by digest, from the state file, and what each may do.

Keys are re-read only when the state file's `keys_version` changes, which is polled at
most every `poll_s` (0.5 s) off the event loop: a revoked or rotated key stops working on
every gateway process within a second, and a quiet gateway costs one tiny query a poll.
If the state file cannot be read (a full or locked disk), the keys last read stay in use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from appliance.gateway.errors import GatewayError
from appliance.keys import KeyRecord, describe_time

log = logging.getLogger("appliance.gateway")


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


class KeyChecker:
    def __init__(
        self,
        records: Callable[[], list[KeyRecord]] | None,
        version: Callable[[], int] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self._records = records
        self._version = version
        self._poll_s = poll_s
        self._by_digest: dict[str, KeyRecord] = {}
        self._seen: int | None = None
        self._polled_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self._records is not None

    async def prime(self) -> None:
        if self._records is not None:
            await self._refresh(force=True)

    def _poll(self, seen: int | None) -> tuple[int | None, list[KeyRecord] | None]:
        assert self._records is not None
        current = self._version() if self._version is not None else None
        if current is not None and current == seen:
            return current, None
        return current, self._records()

    async def _refresh(self, force: bool = False, within: float | None = None) -> None:
        within = self._poll_s if within is None else within
        if not force and time.monotonic() - self._polled_at < within:
            return
        async with self._lock:
            if not force and time.monotonic() - self._polled_at < within:
                return
            try:
                seen, records = await asyncio.to_thread(self._poll, self._seen)
            except Exception as exc:
                log.warning("API keys not readable, keeping the last ones: %r", exc)
            else:
                if records is not None:
                    self._by_digest = {r.digest: r for r in records}
                self._seen = seen
            self._polled_at = time.monotonic()

    def _lookup(self, authorization: str | None) -> tuple[str, KeyRecord | None]:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "", None
        return "bearer", self._by_digest.get(hashlib.sha256(key.strip().encode()).hexdigest())

    async def key(self, authorization: str | None) -> KeyRecord | None:
        """The active key the header carries, or None (no check, no error)."""
        if self._records is None:
            return None
        await self._refresh()
        _, record = self._lookup(authorization)
        return record if record is not None and record.state() == "active" else None

    async def check(self, authorization: str | None) -> KeyRecord | None:
        """The caller's key; 401 when it is missing, unknown, revoked or expired. None
        when the gateway runs without keys."""
        if self._records is None:
            return None
        await self._refresh()
        scheme, record = self._lookup(authorization)
        if scheme and record is None:
            # Perhaps a key made a moment ago: look again now (at most ten times a second,
            # so a flood of bad keys costs one query per tenth of a second).
            await self._refresh(within=0.1)
            scheme, record = self._lookup(authorization)
        if not scheme:
            raise _unauthorized(
                "No API key provided. Send it as 'Authorization: Bearer <key>'; an admin "
                "creates keys with `appliance key create NAME`."
            )
        if record is None:
            # Never echo the key back: it may be a real secret sent to the wrong place.
            raise _unauthorized(
                "Incorrect API key provided. Ask the appliance admin for a valid key."
            )
        state = record.state()
        if state == "revoked":
            raise _unauthorized(
                f"This API key ('{record.name}') was revoked on "
                f"{describe_time(record.revoked_at)}. Ask the appliance admin for a new one."
            )
        if state == "expired":
            raise _unauthorized(
                f"This API key ('{record.name}') expired on "
                f"{describe_time(record.policy.expires_at)}. Ask the appliance admin to "
                "renew it."
            )
        return record
