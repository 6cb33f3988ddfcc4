"""What the gateway costs: streaming chat completions direct to an engine vs through the gateway.

Starts the fake engine and the gateway as subprocesses, then drives both with a closed-loop
load generator (aiohttp, in this process): N workers send streaming chat completions
back to back, first for a warm-up, then for a measured window. Both paths are measured in
the same run, at each concurrency, one after the other. TTFT is the time to the first
chunk that carries content; e2e is the time to ``data: [DONE]``.

The gateway runs with admission and governance on, as in production: an API key with
limits on every request (far above the load, so the shared buckets and in-flight count
are exercised and nothing is refused), the schema checks, prompt tokens counted with a
real tokenizer and chat template (tiny-random-llama's, built into a temporary store)
against a deployment record's context, the per-replica in-flight bound (the record plans
max_num_seqs 1024, like vLLM on a GPU; the fake engine runs 256 at once), and the usage
ledger and audit log written as always. Legs: the engine directly, the gateway with one
worker and with --workers N (default: the cores), and vLLM's Rust router (vllm-router
--policy round_robin) when it is on PATH or given with --vllm-router.

Two scenarios by default, each with its own engine and gateway:

    32 tokens x 20 ms at concurrency 1, 32 and 128
    64 tokens x 10 ms at concurrency 256 (where one gateway process is busiest)

    python benchmarks/gateway_overhead.py                  # both scenarios
    python benchmarks/gateway_overhead.py --scenario 32x20:32   # tokens x ms : concurrencies
    python benchmarks/gateway_overhead.py --gateway proxy  # a plain aiohttp proxy instead

The last lines are machine-readable, one per scenario, at its reference concurrency:

    throughput_ratio=<gateway req/s / direct req/s> ttft_p50_overhead_ms=<gateway - direct>
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
PROXY_ARG = "_serve_proxy"  # argv[1] that turns this file into the plain proxy


# Processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    """A child process, its log file, and how to stop it by its own pid."""

    def __init__(self, name: str, argv: list[str], log: IO[bytes]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.name = name
        self.log = log
        # Its own session: a Ctrl-C at the terminal reaches only us, and we stop it.
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        self.log.seek(0)
        return b"".join(self.log.readlines()[-lines:]).decode(errors="replace")

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with status {self.popen.returncode} before it was ready:\n"
                    f"{self.tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise SystemExit(
            f"{self.name} was not ready at {url} after {timeout:.0f} s:\n{self.tail()}"
        )


@contextmanager
def _started(name: str, argv: list[str], ready_url: str, timeout: float) -> Iterator[_Proc]:
    with tempfile.TemporaryFile() as log:
        proc = _Proc(name, argv, log)
        try:
            proc.wait_ready(ready_url, timeout)
            yield proc
        finally:
            proc.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _tree_cpu_seconds(pid: int) -> float | None:
    """CPU of a process and its descendants (the gateway's workers, the router's threads)."""
    own = _cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(_tree_cpu_seconds(c) or 0.0 for c in _children(pid))


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, from /proc; None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Load generator


@dataclass
class LegResult:
    requests: float = 0.0  # completed inside the measured window, as fractions of requests
    duration: float = 0.0
    ttft: list[float] = field(default_factory=list)  # of requests started inside the window
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> share of one core

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0


class _BadResponse(Exception):
    pass


def _has_content(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            continue
        choices = orjson.loads(payload).get("choices") or ()
        for choice in choices:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                return True
    return False


async def _one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float]:
    """(TTFT, e2e) in seconds for one streaming completion."""
    t0 = time.perf_counter()
    ttft = -1.0
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise _BadResponse(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        pending = b""  # unparsed bytes until the first content chunk, then just the tail
        async for data in resp.content.iter_any():
            if ttft >= 0:
                pending = pending[-32:] + data
                continue
            pending = (pending + data).replace(b"\r\n", b"\n")  # SSE also allows CRLF
            while ttft < 0 and (end := pending.find(b"\n\n")) >= 0:
                event, pending = pending[:end], pending[end + 2 :]
                if _has_content(event):
                    ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    if ttft < 0 or not pending.rstrip().endswith(b"data: [DONE]"):
        raise _BadResponse("the stream ended without content or without data: [DONE]")
    return ttft, e2e


async def _run_leg(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    timing: tuple[float, float, float],
    pids: dict[str, int],
) -> LegResult:
    """Closed loop: ``concurrency`` workers, each sending requests back to back.

    ``timing`` is (warm-up, measured duration, stagger): worker i starts i/concurrency of
    the stagger late, so that completions spread over time instead of arriving in waves.
    """
    warmup, duration, stagger = timing
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=120)
    result = LegResult(duration=duration)
    spans: list[tuple[float, float]] = []  # (start, end) of every successful request
    now = time.perf_counter
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t_measure = now() + warmup
        t_end = t_measure + duration
        first_error: list[str] = []

        async def worker(i: int) -> None:
            await asyncio.sleep(stagger * i / concurrency)
            while (start := now()) < t_end:
                try:
                    ttft, e2e = await _one_request(session, url, body, headers)
                except (TimeoutError, aiohttp.ClientError, _BadResponse) as exc:
                    if start >= t_measure:
                        result.errors += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)  # a broken target must not turn this into a spin
                    continue
                spans.append((start, start + e2e))
                if start >= t_measure:
                    result.ttft.append(ttft)
                    result.e2e.append(e2e)

        async def cpu_window() -> None:
            await asyncio.sleep(max(0.0, t_measure - now()))
            before = {name: _tree_cpu_seconds(pid) for name, pid in pids.items()}
            t0 = now()
            await asyncio.sleep(max(0.0, t_end - now()))
            elapsed = now() - t0
            for name, pid in pids.items():
                after, was = _tree_cpu_seconds(pid), before[name]
                if after is not None and was is not None and elapsed > 0:
                    result.cpu[name] = (after - was) / elapsed

        await asyncio.gather(cpu_window(), *(worker(i) for i in range(concurrency)))
    # Each request counts for the share of its life inside the window: a smooth rate that
    # does not jump by whole requests with where the window's edges fall.
    result.requests = sum(
        max(0.0, min(end, t_end) - max(start, t_measure)) / (end - start)
        for start, end in spans
        if end > start
    )
    if first_error:
        print(f"  first error against {url}: {first_error[0]}", file=sys.stderr)
    return result


# Reporting


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _print_tables(
    results: dict[tuple[int, str], LegResult],
    concurrencies: list[int],
    legs: list[str],
    tokens: int,
) -> None:
    print(
        f"{'conc':>5} {'leg':<16} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p50':>8} "
        f"{'e2e p99':>8} {'err':>4} {'proxy CPU %':>11} {'us/chunk':>9} {'us/req':>7}"
    )
    for c in concurrencies:
        for leg in legs:
            r = results[(c, leg)]
            cpu = r.cpu.get("target")
            per_chunk = per_request = "-"
            if cpu is not None and r.requests and leg != "direct":
                per_chunk = f"{cpu * r.duration / (r.requests * tokens) * 1e6:.1f}"
                per_request = f"{cpu * r.duration / r.requests * 1e6:.0f}"
            print(
                f"{c:>5} {leg:<16} {r.rps:>7.1f} {_pct(r.ttft, 50) * 1e3:>9.1f} "
                f"{_pct(r.ttft, 99) * 1e3:>9.1f} {_pct(r.e2e, 50) * 1e3:>8.1f} "
                f"{_pct(r.e2e, 99) * 1e3:>8.1f} {r.errors:>4} "
                f"{(f'{cpu * 100:.0f}' if cpu is not None and leg != 'direct' else '-'):>11} "
                f"{per_chunk:>9} {per_request:>7}"
            )
    print("(proxy CPU: the gateway's processes, or the router's, as % of one core; us/chunk")
    print(" and us/req: that CPU per streamed token chunk and per request)")


# The plain proxy (``--gateway proxy``), run as this file with PROXY_ARG


def _serve_proxy(port: int, upstream: str) -> None:
    import uvloop
    from aiohttp import web

    async def serve() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )

        async def readyz(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def forward(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = {"content-type": request.headers.get("content-type", "application/json")}
            async with session.request(
                request.method, upstream + request.path_qs, data=body, headers=headers
            ) as up:
                response = web.StreamResponse(
                    status=up.status,
                    headers={"content-type": up.headers.get("content-type", "application/json")},
                )
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response

        app = web.Application()
        app.router.add_get("/readyz", readyz)
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(serve())


# Main


@dataclass(frozen=True)
class Scenario:
    tokens: int
    delay_ms: float
    concurrency: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """TOKENSxMS:C1,C2,... e.g. 64x10:256"""
        try:
            shape, _, levels = text.partition(":")
            tokens, _, delay = shape.partition("x")
            return cls(int(tokens), float(delay), tuple(int(c) for c in levels.split(",")))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TOKENSxMS:C1,C2 (e.g. 64x10:256), got {text!r}"
            ) from None

    @property
    def reference(self) -> int:
        return 32 if 32 in self.concurrency else self.concurrency[-1]


DEFAULT_SCENARIOS = (Scenario(32, 20.0, (1, 32, 128)), Scenario(64, 10.0, (256,)))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        type=Scenario.parse,
        action="append",
        help="TOKENSxMS:C1,C2 (repeatable); default: 32x20:1,32,128 and 64x10:256",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per leg")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per leg")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="gateway workers for the second gateway leg (the first has 1); default: cores",
    )
    parser.add_argument(
        "--vllm-router", default=None, help="vllm-router executable (default: on PATH)"
    )
    parser.add_argument("--proxy", action="store_true", help="add a plain aiohttp proxy leg")
    parser.add_argument(
        "--gateway-arg", action="append", default=[], help="extra argument for the gateway"
    )
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _admission_home(root: Path) -> str:
    """A state directory the gateway admits against: the model in a store (its tokenizer
    and chat template), a deployment record (context, max_num_seqs), and an API key."""
    sys.path.insert(0, str(ROOT))
    from appliance import tinymodel
    from appliance.keys import KeyPolicy
    from appliance.planner import Plan
    from appliance.state import State
    from appliance.store import Store

    Store(root / "models").install(MODEL, tinymodel.build, source="builtin:tiny-random-llama")
    plan = Plan("vllm", "bf16", max_model_len=2048, max_num_seqs=1024, gpus_per_replica=1)
    state = State(root / "state.db")
    state.add_deployment(MODEL, plan)
    # Limits far above the load: every request goes through the shared buckets and the
    # in-flight count, and none is refused.
    policy = KeyPolicy(rpm=10_000_000, tpm=10_000_000_000, concurrency=100_000)
    return state.create_key("benchmark", policy)


@dataclass(frozen=True)
class Target:
    name: str
    argv: list[str]
    url: str
    ready: str


def _targets(args: argparse.Namespace, engine_url: str) -> list[Target]:
    py = sys.executable
    targets = []
    for workers in sorted({1, args.workers}):
        port = _free_port()
        targets.append(
            Target(
                f"gateway {workers}w",
                [
                    *(py, "-m", "appliance.gateway", "--host", "127.0.0.1", "--port", str(port)),
                    *("--workers", str(workers), "--static-replica", f"{MODEL}={engine_url}"),
                    *args.gateway_arg,
                ],
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{port}/healthz",
            )
        )
    router = args.vllm_router or shutil.which("vllm-router")
    if router:
        port = _free_port()
        targets.append(
            Target(
                "vllm-router",
                [
                    router, "--host", "127.0.0.1", "--port", str(port),
                    "--worker-urls", engine_url, "--policy", "round_robin",
                ],
                f"http://127.0.0.1:{port}",
                f"http://127.0.0.1:{port}/health",
            )
        )  # fmt: skip
    else:
        print(
            "vllm-router not found: pass --vllm-router PATH (pip install vllm-router, in a "
            "virtualenv of its own) to measure it beside the gateway",
            file=sys.stderr,
        )
    if args.proxy:
        port = _free_port()
        argv = [py, str(Path(__file__).resolve()), PROXY_ARG, str(port), engine_url]
        targets.append(
            Target(
                "aiohttp proxy", argv, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/readyz"
            )
        )
    return targets


def _run_scenario(
    args: argparse.Namespace, scenario: Scenario, home: Path, key: str
) -> tuple[dict[tuple[int, str], LegResult], list[str]]:
    engine_port = _free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    engine_argv = [
        *(sys.executable, "-m", "appliance.testing.fake_engine", "--host", "127.0.0.1"),
        *("--port", str(engine_port), "--model", MODEL, "--tokens", str(scenario.tokens)),
        *("--delay-ms", str(scenario.delay_ms)),
    ]
    os.environ["APPLIANCE_HOME"] = str(home)
    os.environ.pop("APPLIANCE_CONFIG", None)
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about the quick brown fox."}],
            "stream": True,
            "max_tokens": scenario.tokens,
        }
    )
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    ideal_ms = scenario.tokens * scenario.delay_ms
    targets = _targets(args, engine_url)
    print(
        f"fake engine: {scenario.tokens} tokens x {scenario.delay_ms:g} ms (ideal e2e "
        f"{ideal_ms:.0f} ms); {args.duration:g} s measured per leg after {args.warmup:g} s "
        f"warm-up; legs: direct, {', '.join(t.name for t in targets)}",
        flush=True,
    )
    results: dict[tuple[int, str], LegResult] = {}
    legs = ["direct", *(t.name for t in targets)]
    with ExitStack() as stack:
        engine = stack.enter_context(
            _started("fake engine", engine_argv, f"{engine_url}/health", args.ready_timeout)
        )
        procs = {
            t.name: stack.enter_context(_started(t.name, t.argv, t.ready, args.ready_timeout))
            for t in targets
        }
        urls = {"direct": engine_url, **{t.name: t.url for t in targets}}
        timing = (args.warmup, args.duration, min(args.warmup, ideal_ms / 1e3))

        async def run_all() -> None:
            for c in scenario.concurrency:
                for leg in legs:
                    pids = {"engine": engine.pid, "loadgen": os.getpid()}
                    if leg != "direct":
                        pids["target"] = procs[leg].pid
                    url = f"{urls[leg]}/v1/chat/completions"
                    r = await _run_leg(url, body, headers, c, timing, pids)
                    results[(c, leg)] = r
                    print(
                        f"  c={c:<4} {leg:<14} {r.rps:7.1f} req/s"
                        f"  TTFT p50 {_pct(r.ttft, 50) * 1e3:7.1f} ms"
                        f"  e2e p50 {_pct(r.e2e, 50) * 1e3:7.1f} ms  errors {r.errors}",
                        flush=True,
                    )

        import uvloop

        uvloop.run(run_all())
    print()
    _print_tables(results, list(scenario.concurrency), legs, scenario.tokens)
    print()
    return results, legs


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop the children on kill too
    scenarios = args.scenario or list(DEFAULT_SCENARIOS)
    summary = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        home = Path(tmp)
        key = _admission_home(home)
        for scenario in scenarios:
            results, legs = _run_scenario(args, scenario, home, key)
            ref = scenario.reference
            direct = results[(ref, "direct")]
            for leg in legs[1:]:
                r = results[(ref, leg)]
                ratio = r.rps / direct.rps if direct.rps else math.nan
                overhead = (_pct(r.ttft, 50) - _pct(direct.ttft, 50)) * 1e3
                summary.append(
                    f"{scenario.tokens}x{scenario.delay_ms:g}ms c={ref} {leg}: "
                    f"throughput_ratio={ratio:.3f} ttft_p50_overhead_ms={overhead:.2f}"
                )
    print("\n".join(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == [PROXY_ARG]:
        _serve_proxy(int(sys.argv[2]), sys.argv[3])
    else:
        try:
            main()
        except KeyboardInterrupt:
            print("interrupted; stopped the engine and the gateway", file=sys.stderr)
            sys.exit(130)
