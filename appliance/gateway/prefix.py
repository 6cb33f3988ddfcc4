"""Which replica most likely holds a request's prompt prefix in its cache.

A request's route is a chain of keys, key i standing for the first i+1 blocks of its
prompt (the JSON of the chat messages as sent, or the completion prompt): a CRC-32
chained over those blocks, seeded with the model's name. The first `UNIFORM_BLOCKS`
blocks are `block_chars` long; after them each block is as long as all before it, so a
long conversation costs a few keys (a 32k-character one 19, not 128: per block the
slicing and the loop cost more than the CRC) while short prefixes keep a fine grain.
Only a replica's identity rides on a match, never a cache lookup, so a coarse grain
deep in a prompt loses little. A later turn of a conversation serialises to the earlier
turn's JSON plus more, so it shares every whole block of it; requests under one system
prompt share the blocks the system prompt fills. Only whole blocks count: engines cache whole blocks
too, and a partial one would differ at the next turn anyway. An `X-Appliance-Session`
header adds a key of its own, matched before any block.

The index maps a key to the replicas last sent it (most recent first), least recently
used keys dropped beyond `entries`. Each gateway worker keeps its own, so a prefix costs
at most one cache miss per worker. Sessions must agree across workers from their first
request: `home` places a session no index knows by rendezvous hashing of its key over
the replicas, which needs no shared state (and holds across gateway hosts too).

A key collision (32 bits of CRC per depth) routes a request where its prefix is not
cached: it costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

SESSION_HEADER = "x-appliance-session"
# Blocks of block_chars before they start to double.
UNIFORM_BLOCKS = 16
# Replicas remembered per key: under load one prefix lives on several of them.
HOLDERS = 2
# Keys of sessions live above every block key (block i is i << 32 | crc, i < 2**16).
_SESSION = 1 << 56


@dataclass(frozen=True, slots=True)
class Route:
    """What the replica choice knows of one request's prompt."""

    keys: tuple[int, ...]  # blocks, shortest prefix first
    session: int | None = None  # the session header's key


def prompt_bytes(
    messages: list[dict[str, Any]] | None, prompts: Sequence[str | list[int]] | None
) -> bytes:
    """The prompt as the blocks are cut from: what the engine caches, in the client's form."""
    if messages is not None:
        # The messages as sent, in the client's key order: a client repeats its own order.
        return orjson.dumps(messages)
    if prompts:
        first = prompts[0]
        return first.encode() if isinstance(first, str) else orjson.dumps(first)
    return b""


def route_for(
    model: str,
    data: bytes,
    session: str | None,
    block_chars: int,
    max_blocks: int,
) -> Route | None:
    """The request's keys; None when it has neither a whole block nor a session."""
    seed = zlib.crc32(model.encode())
    view = memoryview(data)
    keys: list[int] = []
    crc = seed
    start, end, size = 0, block_chars, len(data)
    while end <= size and len(keys) < max_blocks:
        crc = zlib.crc32(view[start:end], crc)
        keys.append(len(keys) << 32 | crc)
        start = end
        end += block_chars if len(keys) < UNIFORM_BLOCKS else end
    session_key = None
    if session:
        session_key = _SESSION | zlib.crc32(session.encode(errors="replace"), seed)
    if not keys and session_key is None:
        return None
    return Route(tuple(keys), session_key)


def home(key: int, replica_ids: Sequence[str]) -> str:
    """The replica a key belongs to when no index knows it (rendezvous hashing): the same
    answer in every worker, and a replica leaving moves only its own keys."""
    seed = (key ^ key >> 32) & 0xFFFFFFFF
    return max(replica_ids, key=lambda rid: zlib.crc32(rid.encode(), seed))


class PrefixIndex:
    """Key -> the replicas last sent it; at most `entries` keys, least recently used first
    to go. Used from the event loop's thread only."""

    def __init__(self, entries: int) -> None:
        if entries < 1:
            raise ValueError("a prefix index needs room for at least one entry")
        self.entries = entries
        self._keys: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, route: Route) -> tuple[int, tuple[str, ...]]:
        """(blocks matched, replicas holding the longest match); a session match counts as
        every block. Walks forward and stops at the first unknown block: a prefix of a
        known prompt is known too, so a new prompt costs one lookup."""
        keys = self._keys
        if route.session is not None:
            holders = keys.get(route.session)
            if holders:
                return len(route.keys), holders
        matched = 0
        found: tuple[str, ...] = ()
        for key in route.keys:
            holders = keys.get(key)
            if not holders:
                break
            matched, found = matched + 1, holders
        return matched, found

    def record(self, route: Route, replica_id: str) -> None:
        """The request went to `replica_id`: it now caches every block of it."""
        keys = self._keys
        chain = route.keys if route.session is None else (*route.keys, route.session)
        for key in chain:
            holders = keys.get(key)
            if holders is not None and holders[0] == replica_id:
                keys.move_to_end(key)
                continue
            if holders is None:
                keys[key] = (replica_id,)
            else:
                keys[key] = (replica_id, *(h for h in holders if h != replica_id))[:HOLDERS]
                keys.move_to_end(key)
        while len(keys) > self.entries:
            keys.popitem(last=False)
