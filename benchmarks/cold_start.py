"""Cold start from zero replicas with a real engine: vLLM's CPU build serving the tiny model.

`appliance model add MODEL` and `appliance up` on a fresh home whose appliance.toml lets
the model scale to zero (`min_replicas = 0`, `idle_after_s`), then, for each run: wait
until the supervisor has taken the model to zero replicas, send N streaming chat
completions at once with the official openai client, and read what they waited.

Per run it prints: the requests and how many answered; the replicas started (engine logs
that appeared, and the supervisor's `from_zero` decisions: both must be 1, however many
requests arrived together); the `x-appliance-cold-start-ms` header (p50, max); the time to
first token as the client saw it (send to the first chunk with content, p50, max); and the
wait split at the moment the replica launched its engine (the replica record's
`started_at`, read from the status file):

    serve   send -> engine launched: the gateway telling the registry, the supervisor's
            next reconcile (up to 1 s), Ray Serve starting the replica actor, the replica's
            checks of the weights
    engine  engine launched -> the requests go: vLLM starting (imports, loading, KV cache),
            its health URL, the replica's warm-up request, its first report to the
            registry, and the gateway's next read of the registry (up to 0.5 s)

The load average (1 min) before and after each run goes with it: on cores other jobs
share, these are that machine's figures at that load, not the appliance's alone.

    python benchmarks/cold_start.py                        # 3 runs of 8 requests
    python benchmarks/cold_start.py --runs 1 --requests 16 --idle-after 10

The last line, machine-readable:

    cold_start_ms_p50=<runs' p50s, comma-separated> replicas_started=<per run> ...
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The CLI runner and the percentiles of the engine-path benchmark (which also puts the
# repository on sys.path).
from engine_path import _cli, _free_port, _pct

from appliance.config import load_config
from appliance.control.records import ModelStatus
from appliance.control.runtime import read_status

MODEL = "tiny-random-llama"
HEADER = "x-appliance-cold-start-ms"
PROMPT = [{"role": "user", "content": "Tell me about the quick brown fox, please."}]


@dataclass
class Answer:
    waited_ms: int | None  # the header; None: the request did not wait
    ttft_s: float  # send to the first chunk with content
    sent_at: float  # time.time()
    tokens: int


@dataclass
class Run:
    answers: list[Answer]
    errors: list[str]
    engines_started: int
    from_zero: int
    launched_at: float | None  # the replica's started_at
    load: tuple[float, float]  # 1-min load average before, after

    def row(self, index: int) -> str:
        waits = [float(a.waited_ms) for a in self.answers if a.waited_ms is not None]
        ttft = [a.ttft_s * 1e3 for a in self.answers]
        sent = min((a.sent_at for a in self.answers), default=0.0)
        split = "serve - ms, engine - ms"
        if self.launched_at is not None and waits:
            serve_ms = (self.launched_at - sent) * 1e3
            split = f"serve {serve_ms:.0f} ms, engine {_pct(waits, 50) - serve_ms:.0f} ms"
        return (
            f"run {index}: {len(self.answers)}/{len(self.answers) + len(self.errors)} answered, "
            f"replicas started {self.engines_started} (from_zero {self.from_zero}); "
            f"cold-start header p50 {_pct(waits, 50):.0f} ms max {max(waits, default=0):.0f} ms "
            f"({len(waits)} waited); TTFT p50 {_pct(ttft, 50):.0f} ms max "
            f"{max(ttft, default=0):.0f} ms; {split}; load {self.load[0]:.2f} -> {self.load[1]:.2f}"
        )


def _model(config_path: Path) -> ModelStatus | None:
    status = read_status(load_config(config_path))
    return status.models.get(MODEL) if status is not None else None


def _wait_for_zero(config_path: Path, timeout: float) -> ModelStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = _model(config_path)
        if (
            model is not None
            and model.scaling is not None
            and model.scaling.scaled_to_zero
            and not model.replicas
        ):
            return model
        time.sleep(0.2)
    raise SystemExit(f"{MODEL} did not scale to zero within {timeout:.0f}s: {_model(config_path)}")


def _ask(base: str, key: str, tokens: int) -> Answer:
    import openai

    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=900)
    sent_at, started = time.time(), time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=PROMPT,  # type: ignore[arg-type]
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},  # random weights: count every token
    )
    waited = raw.headers.get(HEADER)
    ttft: float | None = None
    count = 0
    stream = raw.parse()
    assert isinstance(stream, openai.Stream)  # stream=True
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            count += 1
            if ttft is None:
                ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError("the stream had no content")
    return Answer(int(waited) if waited is not None else None, ttft, sent_at, count)


def _run(config_path: Path, home: Path, base: str, key: str, args: argparse.Namespace) -> Run:
    before = _wait_for_zero(config_path, args.idle_after + 120)
    from_zero = before.scaling.decisions.get("from_zero", 0) if before.scaling else 0
    logs = set((home / "logs").glob(f"engine-{MODEL}-*.log"))
    load_before = os.getloadavg()[0]
    answers: list[Answer] = []
    errors: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        futures = [pool.submit(_ask, base, key, args.tokens) for _ in range(args.requests)]
        for future in futures:
            try:
                answers.append(future.result())
            except Exception as exc:  # reported with the run, not fatal to it
                errors.append(f"{type(exc).__name__}: {exc}")
    # The replica is in the status file within a second of being routable.
    deadline, model = time.monotonic() + 5, _model(config_path)
    while (model is None or not model.replicas) and time.monotonic() < deadline:
        time.sleep(0.2)
        model = _model(config_path)
    replicas = model.replicas if model is not None else []
    after = model.scaling.decisions.get("from_zero", 0) if model and model.scaling else 0
    return Run(
        answers,
        errors,
        len(set((home / "logs").glob(f"engine-{MODEL}-*.log")) - logs),
        after - from_zero,
        min((r.started_at for r in replicas), default=None),
        (load_before, os.getloadavg()[0]),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="sent at once, per run")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--idle-after", type=float, default=5.0, help="idle_after_s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.requests < 1 or args.tokens < 1 or args.idle_after <= 0:
        parser.error("--runs, --requests and --tokens must be at least 1, --idle-after above 0")

    from appliance.config import EnginesConfig
    from appliance.engines.cpuenv import CpuEngineEnv

    env = CpuEngineEnv.of(EnginesConfig())
    if env.ensure(lambda line: print(f"  {line}", flush=True)):
        print(f"installed vLLM's CPU build in {env.root}")
    root = Path(tempfile.mkdtemp(prefix="cold-start-"))
    home, port = root / "home", _free_port()
    config = root / "appliance.toml"
    config.write_text(
        f'home = "{home}"\n[gateway]\nport = {port}\ncold_start_timeout_s = 900.0\n'
        f'[models."{MODEL}"]\nmin_replicas = 0\nidle_after_s = {args.idle_after}\n'
    )
    base = f"http://127.0.0.1:{port}/v1"
    runs: list[Run] = []
    try:
        added = _cli(config, "model", "add", MODEL)
        if added.returncode != 0:
            raise SystemExit(added.stdout + added.stderr)
        started = time.monotonic()
        up = _cli(config, "up")
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        print(f"appliance up after {time.monotonic() - started:.1f}s; {os.cpu_count()} cores")
        key = (home / "api-key").read_text().strip()
        for i in range(1, args.runs + 1):
            runs.append(_run(config, home, base, key, args))
            print(runs[-1].row(i), flush=True)
            for error in runs[-1].errors[:3]:
                print(f"  error: {error}")
    finally:
        down = _cli(config, "down", timeout=300)
        print(down.stdout.strip())
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    p50s = ",".join(
        f"{_pct([float(a.waited_ms) for a in r.answers if a.waited_ms is not None], 50):.0f}"
        for r in runs
    )
    started_per_run = ",".join(str(r.engines_started) for r in runs)
    errors = sum(len(r.errors) for r in runs)
    print(f"cold_start_ms_p50={p50s} replicas_started={started_per_run} errors={errors}")
    if any(r.engines_started != 1 or r.from_zero != 1 or r.errors for r in runs):
        raise SystemExit("a run started other than one replica, or had errors")


if __name__ == "__main__":
    main()
