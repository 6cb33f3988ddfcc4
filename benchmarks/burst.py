"""Cloud overflow under a spike: three times local capacity, overflow off and on, one run.

One fake engine plays the local model (`--slots` requests at once, the deployment's
max_num_seqs; each answer `--tokens` tokens `--delay-ms` apart), a fake OpenAI-compatible
provider on loopback plays the cloud (`--cloud-delay-ms` per event), and the real
gateway stands between them, started twice: with `[burst] enabled = false`, then with
overflow on (`latency_target_ms = --target-ms`). Each leg gets the same open-loop spike:
requests arrive evenly at three times what the local slots finish per second, for
`--seconds`. One in `--confidential-every` comes from a key whose data class is
`confidential` (opted in to overflow, so only the data class stops it); the rest from a
`public` key. Every confidential prompt carries a marker, and the fake provider's own
request log is searched for it.

    python benchmarks/burst.py                      # 4 slots, 16 x 25 ms, 10 s, 1000 ms
    python benchmarks/burst.py --seconds 20 --target-ms 500

The table gives, per leg and traffic class, what was sent, the share completed (200 and a
whole stream), TTFT p50/p99 of the completed (to the first content chunk), the share
answered in the cloud and the cloud spend (the ledger's `cost`). The last line is
machine-readable:

    p99_ttft_ms_on=<allowed traffic, overflow on> target_ms=<configured>
    confidential_sent=<requests of the confidential key any fake provider received>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from gateway_overhead import ROOT, _free_port, _has_content, _pct, _started

sys.path.insert(0, str(ROOT))

from appliance.keys import KeyPolicy
from appliance.planner import Plan
from appliance.state import State
from appliance.testing.fake_clouds import OPENAI_KEY

MODEL = "bench-model"
MARKER = "CONFIDENTIAL-7c2e"
PROVIDER = "cloud"
PRICES = (3.0, 15.0)  # per million prompt and completion tokens at the provider


@dataclass
class Outcome:
    cls: str
    status: int = 0
    ttft: float | None = None
    upstream: str = ""
    whole: bool = False


@dataclass
class Leg:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    spend: float = 0.0
    # The gateway's own TTFT of answered requests (the ledger's, from their arrival), per
    # key: the client's figure less the load generator's lag on a busy machine.
    gateway_ttft: dict[str, list[float]] = field(default_factory=dict)


def _config(home: Path, port: int, args: argparse.Namespace, cloud: str, on: bool) -> str:
    burst = f"""
[burst]
enabled = true
[burst.triggers]
latency_target_ms = {args.target_ms}
[burst.policy]
data_classes = ["public"]
opt_in_keys = ["*"]
monthly_cap = 1000.0
max_share = {args.max_share}
[burst.providers.{PROVIDER}]
type = "openai_compatible"
endpoint = "{cloud}/v1"
api_key_env = "BENCH_CLOUD_KEY"
[burst.providers.{PROVIDER}.models]
{MODEL} = {{ model = "cloud-model", input_per_million = {PRICES[0]}, output_per_million = {PRICES[1]} }}
"""  # noqa: E501
    return (
        f'home = "{home}"\n[gateway]\nhost = "127.0.0.1"\nport = {port}\nworkers = 1\n'
        f"[gateway.limits]\nqueue_per_replica = {args.queue}\nqueue_timeout_s = 30.0\n"
        f"max_connections = 4096\nmax_connections_per_client = 4096\n"
        + (burst if on else "[burst]\nenabled = false\n")
    )


async def _one(
    session: aiohttp.ClientSession, url: str, key: str, cls: str, i: int, tokens: int
) -> Outcome:
    content = f"{MARKER} request {i}" if cls == "confidential" else f"request {i}"
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "max_tokens": tokens,
        }
    )
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    outcome = Outcome(cls)
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            outcome.status = resp.status
            outcome.upstream = resp.headers.get("x-appliance-upstream", "")
            if resp.status != 200:
                await resp.read()
                return outcome
            pending = b""
            async for data in resp.content.iter_any():
                pending += data
                while outcome.ttft is None and (end := pending.find(b"\n\n")) >= 0:
                    event, pending = pending[:end], pending[end + 2 :]
                    if _has_content(event):
                        outcome.ttft = time.perf_counter() - t0
                pending = pending[-64:] if outcome.ttft is not None else pending
            outcome.whole = pending.rstrip().endswith(b"data: [DONE]")
    except (TimeoutError, aiohttp.ClientError):
        outcome.status = outcome.status or 599
    return outcome


async def _spike(base: str, keys: dict[str, str], args: argparse.Namespace) -> list[Outcome]:
    url = base + "/v1/chat/completions"
    capacity = args.slots / (args.tokens * args.delay_ms / 1000)  # requests per second
    rate = 3 * capacity
    count = round(rate * args.seconds)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        # Warm-up, one at a time: the gateway learns the local pace (the trigger's estimate).
        for i in range(3):
            await _one(session, url, keys["public"], "public", -1 - i, args.tokens)
        start = time.perf_counter()
        tasks = []
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            cls = "confidential" if i % args.confidential_every == 0 else "public"
            tasks.append(asyncio.ensure_future(_one(session, url, keys[cls], cls, i, args.tokens)))
        return list(await asyncio.gather(*tasks))


def _run_leg(
    name: str, on: bool, root: Path, keys: dict[str, str], engine: str, cloud: str,
    args: argparse.Namespace,
) -> Leg:  # fmt: skip
    port = _free_port()
    config = root / f"appliance-{name}.toml"
    config.write_text(_config(root / "home", port, args, cloud, on))
    argv = [
        *(sys.executable, "-m", "appliance.gateway", "--config", str(config)),
        *("--static-replica", f"{MODEL}={engine}"),
    ]
    leg = Leg(name)
    began = time.time()
    with _started(f"gateway ({name})", argv, f"http://127.0.0.1:{port}/healthz", 60):
        leg.outcomes = asyncio.run(_spike(f"http://127.0.0.1:{port}", keys, args))
    # The gateway moved its last ledger rows when it stopped.
    state = State(root / "home" / "state.db")
    rows = state.usage_rows(since=began)
    leg.spend = sum(r["cost"] or 0.0 for r in rows if r["upstream"] is not None)
    for row in rows:
        if row["status"] == 200 and row["ttft_ms"] is not None and row["request_id"]:
            leg.gateway_ttft.setdefault(row["key"], []).append(row["ttft_ms"])
    return leg


def _print(legs: list[Leg], args: argparse.Namespace) -> float:
    capacity = args.slots / (args.tokens * args.delay_ms / 1000)
    print(
        f"local capacity {capacity:.1f} req/s ({args.slots} slots x {args.tokens} tokens x "
        f"{args.delay_ms} ms); spike {3 * capacity:.1f} req/s for {args.seconds:g} s; "
        f"target {args.target_ms} ms; max_share {args.max_share:g}; "
        f"cloud {args.cloud_delay_ms} ms/event"
    )
    print(
        f"{'overflow':<9} {'traffic':<13} {'sent':>5} {'completed':>10} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'in cloud':>9} {'cloud spend':>12} {'gateway p99':>12}"
    )
    p99_on = float("nan")
    for leg in legs:
        for cls in ("public", "confidential"):
            mine = [o for o in leg.outcomes if o.cls == cls]
            done = [o for o in mine if o.status == 200 and o.whole and o.ttft is not None]
            cloud = [o for o in done if o.upstream.startswith(PROVIDER + ";")]
            ttfts = [o.ttft * 1000 for o in done if o.ttft is not None]
            if leg.name == "on" and cls == "public":
                p99_on = _pct(ttfts, 99)
            spend = f"{leg.spend:.6f}" if cls == "public" else ""
            print(
                f"{leg.name:<9} {cls:<13} {len(mine):>5} {len(done) / max(1, len(mine)):>9.0%} "
                f"{_pct(ttfts, 50):>7.0f}ms {_pct(ttfts, 99):>7.0f}ms "
                f"{len(cloud) / max(1, len(done)):>8.0%} {spend:>12} "
                f"{_pct(leg.gateway_ttft.get(cls, []), 99):>10.0f}ms"
            )
            if cloud and len(cloud) < len(done):  # where the tail comes from
                for where, part in (
                    ("local", [o for o in done if o not in cloud]),
                    ("cloud", cloud),
                ):
                    times = [o.ttft * 1000 for o in part if o.ttft is not None]
                    print(
                        f"{'':<9} {'  ' + where:<13} {len(part):>5} {'':>10} "
                        f"{_pct(times, 50):>7.0f}ms {_pct(times, 99):>7.0f}ms"
                    )
    return p99_on


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=4, help="max_num_seqs of the local model")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--delay-ms", type=int, default=25, help="between local tokens")
    parser.add_argument("--cloud-delay-ms", type=int, default=20, help="between cloud events")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the spike")
    parser.add_argument("--target-ms", type=int, default=1000, help="latency_target_ms")
    parser.add_argument("--max-share", type=float, default=0.9)
    parser.add_argument("--queue", type=int, default=64, help="queue_per_replica")
    parser.add_argument("--confidential-every", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="burst-bench-") as tmp:
        root = Path(tmp)
        state = State(root / "home" / "state.db")
        state.add_deployment(
            MODEL, Plan("vllm", "bf16", max_model_len=4096, max_num_seqs=args.slots)
        )
        keys = {
            "public": state.create_key("public", KeyPolicy(data_class="public")),
            "confidential": state.create_key("confidential", KeyPolicy(data_class="confidential")),
        }
        engine_port = _free_port()
        engine_argv = [
            *(sys.executable, "-m", "appliance.testing.fake_engine", "--port", str(engine_port)),
            *("--model", MODEL, "--tokens", str(args.tokens), "--delay-ms", str(args.delay_ms)),
        ]
        engine = f"http://127.0.0.1:{engine_port}"
        # The fake provider runs in a process of its own, off the load generator's GIL; it
        # writes the bodies it received when it stops.
        cloud_port, seen = _free_port(), root / "cloud-requests.jsonl"
        cloud_argv = [
            *(sys.executable, "-m", "appliance.testing.fake_clouds", "--port", str(cloud_port)),
            *("--delay-ms", str(args.cloud_delay_ms), "--log", str(seen)),
        ]
        cloud = f"http://127.0.0.1:{cloud_port}"
        os.environ["BENCH_CLOUD_KEY"] = OPENAI_KEY  # the gateways inherit it
        with (
            _started("fake engine", engine_argv, engine + "/health", 30),
            _started("fake cloud", cloud_argv, cloud + "/health", 30),
        ):
            legs = [
                _run_leg("off", False, root, keys, engine, cloud, args),
                _run_leg("on", True, root, keys, engine, cloud, args),
            ]
        bodies = seen.read_text().splitlines()
        confidential_sent = sum(MARKER in body for body in bodies)
        p99_on = _print(legs, args)
    print(
        f"p99_ttft_ms_on={p99_on:.0f} target_ms={args.target_ms} "
        f"confidential_sent={confidential_sent}"
    )


if __name__ == "__main__":
    main()
