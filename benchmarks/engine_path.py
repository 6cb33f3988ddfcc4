"""The real engine path: vLLM's CPU build directly vs through the appliance, and `up` to
the first answer.

Three phases, one vLLM process at a time (each phase stops its engine before the next):

1. direct: the engine the replica would run (same adapter, plan, flags and environment:
   appliance.engines.vllm + runner), started by this script, driven at each concurrency.
2. appliance: `appliance model add MODEL` (builds or fetches the model into a fresh home,
   untimed), then `appliance up`, timed until the first chat answer through the gateway
   (the model already in the store, the CPU build already installed), then the same load
   through the gateway (API key, admission, token counting, the replica's engine).
3. `appliance down`.

The load is a closed loop (aiohttp, in this process): N workers send streaming chat
completions back to back, a warm-up, then a measured window. Every request asks for the
same number of tokens (`ignore_eos`, so a real model's short answers count as much) at
temperature 0. TTFT is the time to the first chunk with content; ITL is per request, the
time from the first to the last content chunk over the tokens in between
((t_last - t_first) / (chunks - 1)): under load the engine sends several chunks in one
write, so gaps between chunks as they arrive are mostly 0 and say nothing.

    python benchmarks/engine_path.py      # both models; c = 1, 4, 16; 15 s per leg
    python benchmarks/engine_path.py --model smollm2-135m-instruct
    python benchmarks/engine_path.py --concurrency 1,4 --duration 5 --tokens 16

Run it on otherwise idle cores: the figures are the machine's, not only the appliance's.
Models: tiny-random-llama (random weights, the tests' model) and smollm2-135m-instruct (the
embedded default's). The last lines are machine-readable, one per model:

    <model>: up_returned_s=<s> up_to_first_answer_s=<s> c<N>_rps_ratio=<appliance/direct> ...
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = "tiny-random-llama,smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Tell me about the quick brown fox, please."}]


@dataclass
class Leg:
    duration: float
    requests: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _has_content(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if line.startswith(b"data:") and (payload := line[5:].strip()) != b"[DONE]":
            for choice in orjson.loads(payload).get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    return True
    return False


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float]:
    """(TTFT, ITL) of one streaming chat completion."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    pending = b""
    done = False
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            pending += data
            while (end := pending.find(b"\n\n")) >= 0:
                event, pending = pending[:end], pending[end + 2 :]
                if event.strip() == b"data: [DONE]":
                    done = True
                elif _has_content(event):
                    stamps.append(now)
    if not stamps or not done:
        raise RuntimeError("the stream ended without content or without data: [DONE]")
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else math.nan
    return stamps[0] - t0, itl


async def _leg(
    url: str, key: str | None, model: str, c: int, tokens: int, warmup: float, dur: float
) -> Leg:
    body = orjson.dumps(
        {
            "model": model,
            "messages": PROMPT,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    leg = Leg(duration=dur)
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + dur
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:

        async def worker() -> None:
            while (began := time.perf_counter()) < t_end:
                try:
                    ttft, itl = await _one(session, url, body, headers)
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    leg.errors += began >= t_measure
                    leg.first_error = leg.first_error or f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(0.1)
                    continue
                # Requests that started and finished inside the window count.
                if began >= t_measure and time.perf_counter() <= t_end:
                    leg.requests += 1
                    leg.ttft.append(ttft)
                    leg.itl.append(itl)

        await asyncio.gather(*(worker() for _ in range(c)))
    return leg


def _wait(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the engine exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(config: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _first_answer(base: str, key: str, model: str, deadline: float) -> None:
    body = orjson.dumps({"model": model, "messages": PROMPT, "max_tokens": 1})
    req_headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    while time.monotonic() < deadline:
        request = urllib.request.Request(base + "/chat/completions", data=body, headers=req_headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("no answer through the gateway in time")


def _row(c: int, direct: Leg, appliance: Leg) -> str:
    cells = [f"{c:>4}"]
    for value, digits in (
        (lambda leg: leg.rps, 1),
        (lambda leg: _pct(leg.ttft, 50) * 1e3, 1),
        (lambda leg: _pct(leg.ttft, 99) * 1e3, 1),
        (lambda leg: _pct(leg.itl, 50) * 1e3, 2),
        (lambda leg: _pct(leg.itl, 99) * 1e3, 2),
        (lambda leg: float(leg.errors), 0),
    ):
        cells.append(f"{value(direct):>9.{digits}f}{value(appliance):>9.{digits}f}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODELS, help="comma-separated catalog models")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=15.0, help="measured s per leg")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up s per leg")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = parser.parse_args(argv)

    from appliance.config import EnginesConfig
    from appliance.engines.cpuenv import CpuEngineEnv

    env = CpuEngineEnv.of(EnginesConfig())
    if env.ensure(lambda line: print(f"  {line}", flush=True)):
        print(f"installed vLLM's CPU build in {env.root}")
    summaries = [_bench(model, args) for model in args.model.split(",")]
    print()
    for line in summaries:
        print(line)


def _bench(model: str, args: argparse.Namespace) -> str:
    """Both legs for one model; returns its machine-readable line."""
    levels = [int(c) for c in args.concurrency.split(",")]
    root = Path(tempfile.mkdtemp(prefix="engine-path-"))
    home, port = root / "home", _free_port()
    config = root / "appliance.toml"
    config.write_text(f'home = "{home}"\n[gateway]\nport = {port}\n')
    base = f"http://127.0.0.1:{port}/v1"
    added = _cli(config, "model", "add", model)
    if added.returncode != 0:
        raise SystemExit(added.stdout + added.stderr)
    results: dict[tuple[int, str], Leg] = {}

    def run(url: str, key: str | None, leg: str) -> None:
        for c in levels:
            r = asyncio.run(_leg(url, key, model, c, args.tokens, args.warmup, args.duration))
            results[(c, leg)] = r
            print(
                f"  c={c:<3} {leg:<9} {r.rps:6.1f} req/s  TTFT p50 {_pct(r.ttft, 50) * 1e3:7.1f}"
                f" ms  ITL p50 {_pct(r.itl, 50) * 1e3:6.2f} ms  errors {r.errors}"
                + (f" ({r.first_error})" if r.errors else ""),
                flush=True,
            )

    print(
        f"\nvLLM {model}: {args.tokens} tokens per request, temperature 0; "
        f"{args.duration:g} s measured per leg after {args.warmup:g} s warm-up"
    )
    engine_port = _free_port()
    started = time.monotonic()
    from appliance.testing.engines import start_engine, stop_engine

    engine = start_engine(
        model, home / "models" / model, engine_port, root / "direct-engine.log", home / "run"
    )
    try:
        _wait(f"http://127.0.0.1:{engine_port}/health", 600, engine)
        print(f"direct engine healthy after {time.monotonic() - started:.1f}s")
        run(f"http://127.0.0.1:{engine_port}/v1/chat/completions", None, "direct")
    finally:
        stop_engine(engine)

    started = time.monotonic()
    up = _cli(config, "up")
    up_s = time.monotonic() - started
    try:
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        key = (home / "api-key").read_text().strip()
        _first_answer(base, key, model, time.monotonic() + 120)
        first = time.monotonic() - started
        print(f"appliance up: returned after {up_s:.1f}s, first answer after {first:.1f}s")
        run(base + "/chat/completions", key, "appliance")
    finally:
        down = _cli(config, "down", timeout=180)
        print(down.stdout.strip())
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")

    print()
    names = ("req/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors")
    print("    " + "".join(f"{n:>19}" for n in names))
    print("conc" + "   direct appliance" * len(names))
    for c in levels:
        print(_row(c, results[(c, "direct")], results[(c, "appliance")]))
    ratios = " ".join(
        f"c{c}_rps_ratio={results[(c, 'appliance')].rps / results[(c, 'direct')].rps:.3f}"
        if results[(c, "direct")].rps
        else f"c{c}_rps_ratio=nan"
        for c in levels
    )
    return f"{model}: up_returned_s={up_s:.1f} up_to_first_answer_s={first:.1f} {ratios}"


if __name__ == "__main__":
    main()
