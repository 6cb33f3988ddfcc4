"""How accurate the throughput model is: published results, the fit, the held-out error.

The rows (published.toml, beside this file) are every H100 and H200 FP8 result of NVIDIA
TensorRT-LLM's performance overview (docs/source/performance/perf-overview.md at commit
00f37686aa854010d68bcbd0f4ab000221541ca6, "Throughput Measurements": trtllm-bench, ModelOpt
FP8 checkpoints, "Total Output Throughput (tokens/sec)" of the whole TP group, requests fed
at an infinite rate). Rows of the file's fit_shapes fix the five efficiency factors (`fit`);
the others are held out and only ever compared (`results`, `summary`). `python -m
appliance.planner.validation` prints the table in docs/planning.md; `--fit` refits and
prints the factors to copy into roofline.FITTED.

The prediction runs what the page documents: TP over all the GPUs; MoE models with `--ep`
equal to TP and the page's MoE options, `enable_attention_dp: true` (layout DP + EP;
`--no-attention-dp` refits with TP + EP instead, which fits the fit rows worse: 0.92
against 0.30, the sum of squared log errors). The KV cache the checkpoint's
hf_quant_config.json asks for (each table's kv_cache_quant_algo: the page sets no
kv_cache_config, so trtllm-bench's "auto" keeps it; FP8, or 16-bit for the 405B's null),
in the KV cache and in trtllm-bench's batch tuning; `--kv_cache_free_gpu_mem_fraction 0.95`
("in many cases"); the max_batch_size and max_num_tokens trtllm-bench computes for each
shape (`bench_settings`), each attention-DP rank scheduling its own batch; and as many
sequences of ISL+OSL tokens as the KV cache holds (TensorRT-LLM's default capacity
scheduler reserves a request's whole length).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from appliance.catalog import Catalog, HubSource, ModelEntry, load_catalog
from appliance.errors import PlanError
from appliance.gpus import GPUS, GpuSpec
from appliance.planner.layout import Layout
from appliance.planner.memory import KV_BYTES, EngineLimits, kv_budget, sequences_per_gpu_group
from appliance.planner.roofline import FITTED, Efficiency, Workload, predict
from appliance.strict import Strict, read_toml

DATA = Path(__file__).with_name("published.toml")
BENCH_MEMORY_FRACTION = 0.95
BENCH_MAX_BATCH = 4096  # trtllm-bench: min(KV-cache requests, 4096) / pp
START = Efficiency(compute=0.5, bandwidth=0.8, attention=0.8, experts=1.0, link=0.8)


class Source(Strict):
    repository: str
    path: str
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    section: str
    metric: str
    fit_shapes: list[str]

    def describe(self) -> str:
        return f"{self.repository} {self.path} (commit {self.commit}), {self.section}"


class Table(Strict):
    """One column of one of the page's tables: a model on some GPUs, TP over all of them."""

    model: str
    heading: str  # the page's table
    column: str  # the page's column
    gpus: str  # COUNTxTYPE
    checkpoint: str  # the Hub repository the page names
    # The checkpoint's hf_quant_config.json "kv_cache_quant_algo" ("none": JSON null), which
    # trtllm-bench's kv_cache_dtype "auto" (the page sets no kv_cache_config) keeps.
    kv_cache_quant_algo: Literal["FP8", "none"]
    output_tok_s: dict[str, int]  # "ISL/OSL" -> the published figure

    @property
    def kv_dtype(self) -> str:
        """The KV cache the run had: FP8 when the checkpoint says so, else 16-bit."""
        return "fp8" if self.kv_cache_quant_algo == "FP8" else "bf16"


class Miss(Strict):
    """A held-out row the model misses by more than 25%, and why (docs/planning.md)."""

    model: str
    gpus: str
    shape: str  # "ISL/OSL"
    reason: str


class Published(Strict):
    source: Source
    tables: list[Table]
    outside_target: list[Miss] = Field(default_factory=list)


def load(path: Path = DATA) -> Published:
    """The published rows (appliance/planner/published.toml)."""
    data = read_toml(path, PlanError, "published results file")
    try:
        return Published.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{path}: {exc}", hint="Fix the field named above.") from None


PUBLISHED = load()
SOURCE = PUBLISHED.source.describe()
FIT_SHAPES = frozenset(PUBLISHED.source.fit_shapes)


@dataclass(frozen=True)
class Row:
    model: str
    gpus: str  # COUNTxTYPE, TP over all of them
    isl: int
    osl: int
    published: float  # output tokens/s
    checkpoint: str
    kv_dtype: str  # "fp8" or "bf16" (Table.kv_dtype)

    @property
    def fit(self) -> bool:
        return self.shape in FIT_SHAPES

    @property
    def shape(self) -> str:
        return f"{self.isl}/{self.osl}"


ROWS: tuple[Row, ...] = tuple(
    Row(t.model, t.gpus, int(isl), int(osl), float(value), t.checkpoint, t.kv_dtype)
    for t in PUBLISHED.tables
    for shape, value in t.output_tok_s.items()
    for isl, osl in [shape.split("/")]
)


@dataclass(frozen=True)
class Result:
    row: Row
    moe: bool
    layout: str
    batch: int
    predicted: float

    @property
    def error(self) -> float:
        """Relative error of the prediction, + when it is too high."""
        return self.predicted / self.row.published - 1


def bench_settings(
    entry: ModelEntry, gpu: GpuSpec, tp: int, isl: int, osl: int, kv_dtype: str = "fp8"
) -> tuple[int, int]:
    """(max_batch_size, max_num_tokens) that trtllm-bench gives the engine:
    calc_engine_setting and finetune_setting in tensorrt_llm/bench/build/tuning.py, for an
    FP8 checkpoint whose KV cache is `kv_dtype` (its byte_per_kv_elem: 1 for a checkpoint's
    kv_cache_quant_algo FP8, 2 for none) and no pipeline parallelism; then, on the PyTorch
    backend with chunked prefill off (trtllm-bench's default, and the page's commands do not
    turn it on), get_settings in tensorrt_llm/bench/benchmark/utils/general.py raises
    max_num_tokens to at least ISL + max_batch_size (NVIDIA/TensorRT-LLM#5625), so that a
    whole prompt fits one step."""
    arch, gib = entry.architecture, 2**30
    per_token = 2 * arch.num_layers * max(tp, arch.num_kv_heads) * arch.head_dim / gib
    per_token *= KV_BYTES[kv_dtype]
    engine = arch.params_total_b * 1e9 / gib
    cache = (gpu.memory_bytes / gib * tp - engine) * BENCH_MEMORY_FRACTION
    raw_bs = min(cache / (per_token * (isl + osl)), BENCH_MAX_BATCH)
    raw_token = min(raw_bs * (1 + isl / osl), 32768)
    max_bs = _step_up(raw_bs, ((256, 32), (1024, 128), (math.inf, 256)), least=64)
    max_tokens = _step_up(raw_token, ((4096, 256), (8192, 512), (math.inf, 1024)), least=2048)
    return max_bs, max(max_tokens, isl + max_bs)


def _step_up(value: float, bands: tuple[tuple[float, int], ...], least: int) -> int:
    """finetune_setting's rounding: up to the step of the first band `value` is below."""
    step = next(step for limit, step in bands if value < limit)
    return max(least, step * math.ceil(value / step))


def _setup(catalog: Catalog, row: Row, attention_dp: bool) -> Callable[[Efficiency], Result]:
    """What the efficiency factors do not change (layout, batch), computed once per row."""
    entry = catalog.get(row.model)
    sources = {**entry.sources, "fp8": HubSource(repo=row.checkpoint)}
    entry = entry.model_copy(update={"sources": sources})
    count, _, kind = row.gpus.partition("x")
    gpu, n = GPUS[kind], int(count)
    moe = entry.architecture.is_moe
    layout = Layout(n, 1, "ep", attention_dp) if moe and n > 1 else Layout(n)
    max_bs, max_tokens = bench_settings(entry, gpu, n, row.isl, row.osl, row.kv_dtype)
    limits = EngineLimits("trtllm", BENCH_MEMORY_FRACTION, True, max_bs, max_tokens)
    budget = kv_budget(entry, gpu, "fp8", layout, limits)[2]
    seqs = sequences_per_gpu_group(entry, row.isl + row.osl, row.kv_dtype, layout, budget, "trtllm")
    # Each attention-DP rank schedules its own batch, up to max_batch_size.
    cap = max_bs * (n if layout.attention_dp else 1)
    batch = max(1, min(int(seqs), cap))
    shape = Workload(row.isl, row.osl)

    def run(eff: Efficiency) -> Result:
        t = predict(
            entry,
            gpu,
            "fp8",
            row.kv_dtype,
            n,
            1,
            batch,
            shape,
            layout=layout,
            efficiency=eff,
            engine="trtllm",
        )
        return Result(row, moe, layout.describe(), batch, t.output_tok_s)

    return run


def results(
    eff: Efficiency = FITTED, rows: Iterable[Row] = ROWS, attention_dp: bool = True
) -> list[Result]:
    catalog = load_catalog()
    return [_setup(catalog, row, attention_dp)(eff) for row in rows]


def fit(
    rows: Iterable[Row] | None = None, attention_dp: bool = True, sweeps: int = 10
) -> Efficiency:
    """The factors that minimise the squared log error over `rows` (default: the fit rows),
    by coordinate descent with a golden-section search on each factor in its range."""
    catalog = load_catalog()
    chosen = list(rows) if rows is not None else [r for r in ROWS if r.fit]
    runs = [_setup(catalog, row, attention_dp) for row in chosen]

    def loss(eff: Efficiency) -> float:
        return sum(math.log(1 + run(eff).error) ** 2 for run in runs)

    ranges = {"compute": (0.2, 1.0), "bandwidth": (0.3, 1.0), "attention": (0.2, 1.0)}
    ranges["experts"] = (0.2, 1.5)
    ranges["link"] = (0.1, 1.0)
    eff = START
    for _ in range(sweeps):
        for name, (low, high) in ranges.items():
            a, b = low, high
            ratio = (math.sqrt(5) - 1) / 2
            for _ in range(40):
                c, d = b - ratio * (b - a), a + ratio * (b - a)
                if loss(replace(eff, **{name: c})) < loss(replace(eff, **{name: d})):
                    b = d
                else:
                    a = c
            eff = replace(eff, **{name: (a + b) / 2})
    return eff


@dataclass(frozen=True)
class Summary:
    rows: int
    median: float  # of |error|
    worst: float  # max |error|


def summary(items: Iterable[Result]) -> Summary:
    errors = [abs(r.error) for r in items]
    return Summary(len(errors), statistics.median(errors), max(errors))


def table(items: list[Result]) -> str:
    """The Markdown table of docs/planning.md."""
    lines = [
        "| model | GPUs | layout | ISL/OSL | set | batch | published | predicted | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in items:
        lines.append(
            f"| {r.row.model} | {r.row.gpus} | {r.layout} | {r.row.shape} | "
            f"{'fit' if r.row.fit else 'held out'} | {r.batch} | {r.row.published:,.0f} | "
            f"{r.predicted:,.0f} | {r.error:+.0%} |"
        )
    lines.append("")
    lines.append("| rows | count | median abs error | max abs error |")
    lines.append("|---|---|---|---|")
    groups = {
        "held out, dense": [r for r in items if not r.row.fit and not r.moe],
        "held out, MoE": [r for r in items if not r.row.fit and r.moe],
        "held out, all": [r for r in items if not r.row.fit],
        "fit, all": [r for r in items if r.row.fit],
    }
    for name, group in groups.items():
        if group:
            s = summary(group)
            lines.append(f"| {name} | {s.rows} | {s.median:.1%} | {s.worst:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit the factors on the fit rows")
    parser.add_argument(
        "--no-attention-dp", action="store_true", help="run MoE rows as TP + EP (refits)"
    )
    args = parser.parse_args(argv)
    attention_dp = not args.no_attention_dp
    refit = args.fit or args.no_attention_dp
    eff = fit(attention_dp=attention_dp) if refit else FITTED
    if refit:
        print(
            f"Efficiency(compute={eff.compute:.3f}, bandwidth={eff.bandwidth:.3f}, "
            f"attention={eff.attention:.3f}, experts={eff.experts:.3f}, link={eff.link:.3f})\n"
        )
    print(f"Source: {SOURCE}.\n")
    print(table(results(eff, attention_dp=attention_dp)))


if __name__ == "__main__":
    main()
