"""`appliance top`: per-model traffic, latency and health, live in the terminal.

It reads what is on this host, without a key and without the network: the gateway's
metric files (`<run>/gateway-metrics`, the very files every `/metrics` scrape adds up,
read with prometheus-client's own multiprocess collector) and the supervisor's status
file (replicas, their health, and each engine's own count of running and waiting
requests). Rates and percentiles are over the last `WINDOW_S` seconds the view has seen;
`--once` samples twice, `--interval` apart, and prints that one frame.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from appliance.cli.common import config_of, console
from appliance.config import ApplianceConfig
from appliance.control.records import StatusFile
from appliance.control.runtime import read_status
from appliance.errors import ApplianceError

WINDOW_S = 30.0
NONE = "-"
# Headers on two lines where that keeps a frame within 80 columns. running and waiting
# are the engines' own counts, as their replicas last reported them.
COLUMNS = (
    "model", "health", "replicas\nup", "engine\nrunning", "engine\nwaiting", "req/s",
    "tok/s", "TTFT\np50", "TTFT\np95", "requests", "5xx",
)  # fmt: skip
WIDTH = 112  # a frame printed with --once (no terminal to fit): wide enough for every column


@dataclass
class ModelFigures:
    """One model's counters at one moment (cumulative, since the gateway started)."""

    requests: float = 0.0
    errors: float = 0.0  # answered with a 5xx
    completion_tokens: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


@dataclass
class Sample:
    at: float
    models: dict[str, ModelFigures]
    in_flight: float


def metrics_dir(config: ApplianceConfig) -> Path:
    return config.run_dir / "gateway-metrics"


def sample(path: Path) -> Sample:
    """The gateway's counters now, summed over its workers' files."""
    from prometheus_client import CollectorRegistry, multiprocess

    models: dict[str, ModelFigures] = {}
    in_flight = 0.0
    if not path.is_dir():  # the gateway has not started (yet)
        return Sample(time.time(), models, in_flight)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    for family in registry.collect():
        for s in family.samples:
            model = s.labels.get("model")
            if s.name == "appliance_gateway_in_flight":
                in_flight += s.value
            if model is None or model == NONE:
                continue
            figures = models.setdefault(model, ModelFigures())
            if s.name == "appliance_requests_total":
                figures.requests += s.value
                if s.labels.get("status", "").startswith("5"):
                    figures.errors += s.value
            elif s.name == "appliance_completion_tokens_total":
                figures.completion_tokens += s.value
            elif s.name == "appliance_time_to_first_token_seconds_bucket":
                le = float(s.labels["le"])
                figures.ttft[le] = figures.ttft.get(le, 0.0) + s.value
    return Sample(time.time(), models, in_flight)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Like PromQL's histogram_quantile: linear within the bucket holding the q-th
    observation; None without observations."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    rank = q * buckets[edges[-1]]
    lower, below = 0.0, 0.0
    for le in edges:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bucket: its bound is all we know
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1)
        lower, below = le, count
    return lower


def _delta(new: ModelFigures, old: ModelFigures | None) -> ModelFigures:
    if old is None:
        return new
    return ModelFigures(
        new.requests - old.requests,
        new.errors - old.errors,
        new.completion_tokens - old.completion_tokens,
        {le: n - old.ttft.get(le, 0.0) for le, n in new.ttft.items()},
    )


def _ms(seconds: float | None) -> str:
    return NONE if seconds is None else f"{seconds * 1000:.0f}ms"


def frame(samples: deque[Sample], status: StatusFile | None) -> Group:
    """One view: a header and a row per model."""
    first, last = samples[0], samples[-1]
    span = last.at - first.at
    served = status.models if status is not None else {}
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for name in COLUMNS:
        table.add_column(
            name, justify="left" if name in ("model", "health") else "right", no_wrap=True
        )
    for model in sorted(set(last.models) | set(served)):
        now = last.models.get(model, ModelFigures())
        window = _delta(now, first.models.get(model)) if span > 0 else ModelFigures()
        info = served.get(model)
        if info is not None:
            healthy = info.healthy_replicas
            loads = [r.load for r in info.replicas if r.load is not None]
            health = Text("healthy" if healthy else "down", style="green" if healthy else "red")
            if info.message:
                health = Text(info.status or "degraded", style="yellow")
            replica_text = f"{healthy}/{len(info.replicas)}"
            running = f"{sum(x.running for x in loads):g}"
            waiting = f"{sum(x.waiting for x in loads):g}"
        else:
            health, replica_text, running, waiting = Text(NONE), NONE, NONE, NONE
        rate = f"{window.requests / span:.1f}" if span > 0 else NONE
        tokens = f"{window.completion_tokens / span:.0f}" if span > 0 else NONE
        table.add_row(
            model,
            health,
            replica_text,
            running,
            waiting,
            rate,
            tokens,
            _ms(quantile(0.5, window.ttft)),
            _ms(quantile(0.95, window.ttft)),
            f"{now.requests:.0f}",
            f"{now.errors:.0f}",
        )
    when = time.strftime("%H:%M:%S", time.localtime(last.at))
    if status is None:
        where = "no supervisor running (replicas and health unknown)"
    else:
        where = f"endpoint {status.endpoint or NONE}, phase {status.phase}"
    header = Text(
        f"appliance top  {when}  {where}\ngateway in flight {last.in_flight:g}; rates and "
        f"TTFT over the last {span:.1f}s"
    )
    if not table.row_count:
        return Group(header, Text("No models deployed and no requests seen yet."))
    return Group(header, table)


def top(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (scripts, tests)."),
    interval: float = typer.Option(
        1.0, "--interval", min=0.1, help="Seconds between samples (and refreshes)."
    ),
) -> None:
    """Live per-model requests/s, TTFT p50/p95, tokens/s, queue, replicas and health."""
    config = config_of(ctx)
    path = metrics_dir(config)
    status = read_status(config)
    if not path.is_dir() and status is None:
        raise ApplianceError(
            f"no gateway metrics in {path} and no appliance running",
            hint="Start it with `appliance up`; `appliance top` shows what its gateway "
            "serves (on the appliance's host, with its home).",
        )
    samples: deque[Sample] = deque([sample(path)])
    if once:
        time.sleep(interval)
        samples.append(sample(path))
        wide = Console(highlight=False, width=max(console.width, WIDTH))
        wide.print(frame(samples, read_status(config)))
        return
    try:
        with Live(frame(samples, status), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                samples.append(sample(path))
                while samples[-1].at - samples[0].at > WINDOW_S:
                    samples.popleft()
                live.update(frame(samples, read_status(config)), refresh=True)
    except KeyboardInterrupt:
        return
