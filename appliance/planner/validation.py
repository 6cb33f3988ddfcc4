"""How accurate the throughput model is: published results, the fit, the held-out error.

The rows are every H100 and H200 FP8 result of NVIDIA TensorRT-LLM's performance overview
(docs/source/performance/perf-overview.md at commit 00f37686aa854010d68bcbd0f4ab000221541ca6,
"Throughput Measurements": trtllm-bench, ModelOpt FP8 checkpoints, "Total Output Throughput
(tokens/sec)" of the whole TP group, requests fed at an infinite rate). Rows with fit=True
fix the four efficiency factors (`fit`); the others are held out and only ever compared
(`errors`). `python -m appliance.planner.validation` prints the table in docs/planning.md;
`--fit` refits and prints the factors to copy into roofline.FITTED.

The prediction runs what NVIDIA ran, from that page: TP over all the GPUs; MoE models with
`--ep` equal to TP (layout TP + EP). The page's MoE options also show `enable_attention_dp`
(layout DP + EP); fitted that way the fit rows come out worse (`python -m
appliance.planner.validation --attention-dp`), so the table uses TP + EP. KV cache FP8
(ModelOpt exports set kv_cache_quant_algo FP8); `--kv_cache_free_gpu_mem_fraction 0.95`
("in many cases"); and as many sequences of ISL+OSL tokens as the KV cache holds, capped at
the 4096 that trtllm-bench's finetune_setting allows (tensorrt_llm/bench/build/tuning.py),
per attention-DP rank, since each rank schedules its own batch.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from appliance.catalog import Catalog, load_catalog
from appliance.gpus import GPUS
from appliance.planner.layout import Layout
from appliance.planner.memory import EngineLimits, kv_budget, sequences_per_gpu_group
from appliance.planner.roofline import FITTED, Efficiency, Workload, predict

SOURCE = (
    "NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md "
    "(commit 00f37686aa854010d68bcbd0f4ab000221541ca6), Throughput Measurements"
)
BENCH_MEMORY_FRACTION = 0.95
BENCH_MAX_BATCH = 4096  # trtllm-bench: min(KV-cache requests, 4096) / pp
START = Efficiency(compute=0.5, bandwidth=0.8, attention=0.8, experts=1.0)  # where fit begins
FIT_SHAPES = frozenset({(128, 128), (1000, 1000), (2048, 2048), (5000, 500)})

# model -> GPUs it ran on (TP = all of them) -> {(ISL, OSL): published output tokens/s}.
_SHAPES = [
    (128, 128),
    (128, 2048),
    (128, 4096),
    (500, 2000),
    (1000, 1000),
    (1000, 2000),
    (2048, 128),
    (2048, 2048),
    (5000, 500),
    (20000, 2000),
]
# Columns of the page's tables, in _SHAPES order; None where the page has no figure.
_PUBLISHED: dict[str, dict[str, list[int | None]]] = {
    "llama-3.1-8b-instruct": {  # table "Llama 3.1 8B": H200 TP1, H100 TP1
        "1xH200": [27911, 26221, 18027, 20770, 17744, 16828, 3538, 12194, 3902, 1804],
        "1xH100-80GB": [28312, 22714, 14325, 17660, 15220, 13899, 3450, 9305, 3459, 1351],
    },
    "llama-3.3-70b-instruct": {  # table "Llama 3.3 70B": H200 TP1, H100 TP2
        "1xH200": [3803, 4336, 2872, 3666, 2909, 2994, 442, 2003, 566, 283],
        "2xH100-80GB": [6378, 6651, 4199, 5222, 4205, 4146, 762, 3082, 898, 437],
    },
    "llama-3.1-405b-instruct": {  # table "Llama 3.1 405B": H200 TP8, H100 TP8
        "8xH200": [3814, 5348, 4741, 4724, 3330, 3722, 456, 2948, 650, 505],
        "8xH100-80GB": [3627, 4340, 3116, 3994, 2919, 2895, 453, 2296, 610, 345],
    },
    "llama-4-scout": {  # table "Llama 4 Scout": H200 TP4, H100 TP4
        "4xH200": [30354, 34316, 21332, 24630, 21636, 18499, 3699, 14949, 4605, 2105],
        "4xH100-80GB": [None, 15130, 8603, 12399, 12129, 9838, 3253, 7972, 3342, None],
    },
    "llama-4-maverick": {  # table "Llama 4 Maverick": H200 TP8, H100 TP8
        "8xH200": [63994, 40572, 24616, 37835, 31782, 34734, 7307, 20957, 8456, 4106],
        "8xH100-80GB": [None, 10829, 6744, 10108, 9677, 9151, None, 6916, 3457, None],
    },
    "qwen3-235b-a22b": {  # table "Qwen3-235B-A22B": H200 TP8, H100 TP8
        "8xH200": [30429, 42821, 26852, 28026, 23789, 22061, 3331, 16672, 3623, 1876],
        "8xH100-80GB": [None, 19658, 12447, 18351, 14898, 15136, None, 9924, 3225, None],
    },
}


@dataclass(frozen=True)
class Row:
    model: str
    gpus: str  # COUNTxTYPE, TP over all of them
    isl: int
    osl: int
    published: float  # output tokens/s

    @property
    def fit(self) -> bool:
        return (self.isl, self.osl) in FIT_SHAPES

    @property
    def shape(self) -> str:
        return f"{self.isl}/{self.osl}"


ROWS: tuple[Row, ...] = tuple(
    Row(model, gpus, isl, osl, float(value))
    for model, columns in _PUBLISHED.items()
    for gpus, values in columns.items()
    for (isl, osl), value in zip(_SHAPES, values, strict=True)
    if value is not None
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


def _setup(catalog: Catalog, row: Row, attention_dp: bool) -> Callable[[Efficiency], Result]:
    """What the efficiency factors do not change (layout, batch), computed once per row."""
    entry = catalog.get(row.model)
    count, _, kind = row.gpus.partition("x")
    gpu, n = GPUS[kind], int(count)
    moe = entry.architecture.is_moe
    layout = Layout(n, 1, "ep", attention_dp) if moe and n > 1 else Layout(n)
    limits = EngineLimits("trtllm", BENCH_MEMORY_FRACTION, True, BENCH_MAX_BATCH, 8192)
    budget = kv_budget(entry, gpu, "fp8", layout, limits)[2]
    seqs = sequences_per_gpu_group(entry, row.isl + row.osl, "fp8", layout, budget, "trtllm")
    cap = BENCH_MAX_BATCH * (n if layout.attention_dp else 1)
    batch = max(1, min(int(seqs), cap))
    shape = Workload(row.isl, row.osl)

    def run(eff: Efficiency) -> Result:
        t = predict(entry, gpu, "fp8", "fp8", n, 1, batch, shape, layout=layout, efficiency=eff)
        return Result(row, moe, layout.describe(), batch, t.output_tok_s)

    return run


def results(
    eff: Efficiency = FITTED, rows: Iterable[Row] = ROWS, attention_dp: bool = False
) -> list[Result]:
    catalog = load_catalog()
    return [_setup(catalog, row, attention_dp)(eff) for row in rows]


def fit(
    rows: Iterable[Row] | None = None, attention_dp: bool = False, sweeps: int = 10
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
        "--attention-dp", action="store_true", help="run MoE rows as DP + EP (refits)"
    )
    args = parser.parse_args(argv)
    eff = fit(attention_dp=True) if args.attention_dp else fit() if args.fit else FITTED
    if args.fit or args.attention_dp:
        print(
            f"Efficiency(compute={eff.compute:.3f}, bandwidth={eff.bandwidth:.3f}, "
            f"attention={eff.attention:.3f}, experts={eff.experts:.3f})\n"
        )
    print(f"Source: {SOURCE}.\n")
    print(table(results(eff, attention_dp=args.attention_dp)))


if __name__ == "__main__":
    main()
