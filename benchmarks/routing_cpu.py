"""CPU the replica choice adds per request: the prefix keys, the index and the scoring.

In one process, no sockets: a ReplicaTable with N replicas (engine load reports fresh)
admits and releases requests back to back on one event loop, for each policy and each
prompt shape, and prints microseconds of process CPU per request, and the extra over
`least_outstanding` (what the gateway did before). A second table fills its prefix index
to `index_entries` to show the memory it holds (tracemalloc).

    python benchmarks/routing_cpu.py               # 4 replicas, 20000 requests per cell
    python benchmarks/routing_cpu.py --replicas 16 --requests 50000

Prompt shapes: `short` (a 60-character user turn: no whole block, so no keys), `system`
(a 2.4k-character system prompt plus a unique user turn, 9 blocks of 256), `conversation`
(a 32k-character conversation: 19 blocks), `session` (short, with
a session header). Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc
from typing import Any

from appliance.config import GatewayRouting
from appliance.engines.base import EngineLoad
from appliance.gateway.replicas import Replica, ReplicaTable

SYSTEM = "You answer questions about the appliance's routing, briefly. " * 40


def _shapes(i: int) -> dict[str, tuple[list[dict[str, Any]], str | None]]:
    user = {"role": "user", "content": f"What does request {i} cost? Say it in one sentence."}
    turns = [
        {"role": "user" if t % 2 else "assistant", "content": f"turn {t} " + "word " * 160}
        for t in range(40)
    ]
    return {
        "short": ([user], None),
        "system": ([{"role": "system", "content": SYSTEM}, user], None),
        "conversation": ([*turns, user], None),
        "session": ([user], f"session-{i % 500}"),
    }


def _table(policy: str, replicas: int, **settings: Any) -> ReplicaTable:
    table = ReplicaTable(routing=GatewayRouting(policy=policy, **settings), seed=1)  # type: ignore[arg-type]
    table.replace(
        ["m"],
        [
            Replica(f"r{k}", "m", f"http://r{k}", "m", "m", None, EngineLoad(k, 0, 0.1 * k), 0.1)
            for k in range(replicas)
        ],
    )
    return table


async def _run(table: ReplicaTable, shape: str, requests: int) -> float:
    """Process CPU microseconds per request: route, admit, release."""
    bodies = [_shapes(i)[shape] for i in range(min(requests, 1000))]
    start = time.process_time()
    for i in range(requests):
        messages, session = bodies[i % len(bodies)]
        route = table.chooser.route("m", messages, None, session)
        replica = await table.admit("m", 256, 0, 1.0, route=route)
        assert replica is not None
        table.release(replica)
    return (time.process_time() - start) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--index-entries", type=int, default=65_536)
    args = parser.parse_args()
    policies = ("least_outstanding", "load", "prefix")
    shapes = ("short", "system", "conversation", "session")
    print(f"{args.replicas} replicas, {args.requests} requests per cell, us CPU per request")
    print(f"{'shape':<14}" + "".join(f"{p:>19}" for p in policies) + f"{'prefix extra':>14}")
    for shape in shapes:
        cells = [
            asyncio.run(_run(_table(p, args.replicas, max_blocks=24), shape, args.requests))
            for p in policies
        ]
        row = "".join(f"{c:>19.1f}" for c in cells)
        print(f"{shape:<14}{row}{cells[2] - cells[0]:>14.1f}")
    tracemalloc.start()
    table = _table("prefix", args.replicas, index_entries=args.index_entries)
    before = tracemalloc.get_traced_memory()[0]
    index = table.chooser.index
    assert index is not None
    blocks = 0
    i = 0
    while len(index) < args.index_entries:
        messages = [{"role": "user", "content": f"{i:012d} " + "x" * 2100}]
        route = table.chooser.route("m", messages, None, None)
        assert route is not None
        index.record(route, f"r{i % args.replicas}")
        blocks += len(route.keys)
        i += 1
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(
        f"index full at {len(index)} entries: {held / 2**20:.1f} MiB "
        f"({held / len(index):.0f} bytes per entry)"
    )


if __name__ == "__main__":
    main()
