"""The Grafana dashboards, built with Grafana's own types (grafana-foundation-sdk).

    python -m appliance.observability.dashboards [--check]

writes one JSON file per dashboard to playbooks/roles/monitoring/files/dashboards/ (the
installer provisions them into Grafana); `--check` only says whether the committed files
are what this module builds. A test does the same, and parses every query to check that it
names only metrics the gateway, the engines or the DCGM exporter export (contract.py and
the engines' lists in tests/fixtures/contracts/).

    overview   traffic, latency percentiles, errors, saturation: is the appliance well?
    model      one model: its requests, latencies, tokens, replicas, queue and rejections
    keys       per API key: requests, tokens, spend, errors
    engines    the engines' own view: KV cache, running and waiting, preemptions, prefix cache
    gpus       DCGM: utilisation, memory, temperature and power of every GPU

Queries use Grafana's `$__rate_interval` and `$__range` and the dashboards' variables
(`$model`, `$key`, `$node`), each of which allows "All" (`.*`). The datasource is the one the
installer provisions, uid `appliance-prometheus`.

This module needs grafana-foundation-sdk (the `test` extra); nothing at run time imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE_UID = "appliance-prometheus"
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
OUT_DIR = Path(__file__).resolve().parents[2] / "playbooks/roles/monitoring/files/dashboards"
RATE = "[$__rate_interval]"
QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
REF_IDS = "ABCDEFGH"


# Building blocks.


def _q(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    return query.instant() if instant else query.range()


def _ts(
    title: str, description: str, unit: str, *queries: prometheus.Dataquery, width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            common_builder.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["mean", "max", "lastNotNull"])
        )
    )
    for ref, query in zip(REF_IDS, queries, strict=False):
        panel = panel.with_target(query.ref_id(ref))
    return panel


def _stat(
    title: str, description: str, unit: str, query: prometheus.Dataquery, width: int = 6
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(query.ref_id("A"))
    )


def _table(
    title: str, description: str, unit: str, *queries: prometheus.Dataquery, width: int = 12
) -> table.Panel:
    panel = (
        table.Panel()
        .show_header(True)
        .align(common.FieldTextAlignment.AUTO)
        .inspect(False)
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(width)
        .height(8)
    )
    for ref, query in zip(REF_IDS, queries, strict=False):
        panel = panel.with_target(query.ref_id(ref).format(PromQueryFormat.TABLE))
    return panel


def _variable(name: str, label: str, query: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def _dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["appliance"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .readonly()
    )


def _quantiles(metric: str, selector: str, by: str = "") -> list[prometheus.Dataquery]:
    """p50/p95/p99 of a histogram, summed over replicas (and by `by` when given)."""
    group = f"le, {by}" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return [
        _q(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}{RATE})))",
            f"{prefix}{name}",
        )
        for q, name in QUANTILES
    ]


def _error_ratio(selector: str, by: str = "") -> str:
    """5xx answers over all answers; 0 (not nothing) when there were none."""
    group = f" by ({by})" if by else ""
    errors = selector[:-1] + ', status=~"5.."}' if selector else '{status=~"5.."}'
    zero = f"(sum{group} (rate(appliance_requests_total{selector}{RATE})) * 0)"
    return (
        f"(sum{group} (rate(appliance_requests_total{errors}{RATE})) or {zero})\n"
        f"/ sum{group} (rate(appliance_requests_total{selector}{RATE}))"
    )


# The dashboards.


def overview() -> db.Dashboard:
    d = _dashboard(
        "appliance-overview",
        "Appliance overview",
        "Is the appliance well? Traffic, latency percentiles, errors and saturation, all "
        "models together (as the gateway sees them).",
    )
    d = d.with_row(db.Row("Now"))
    d = d.with_panel(
        _stat(
            "Requests/s",
            "Requests answered per second, every model and key.",
            "reqps",
            _q(f"sum(rate(appliance_requests_total{RATE}))"),
        )
    )
    d = d.with_panel(
        _stat(
            "Error ratio (5xx)",
            "Share of answers that were server errors.",
            "percentunit",
            _q(_error_ratio("")),
        )
    )
    d = d.with_panel(
        _stat(
            "TTFT p95",
            "95% of first tokens arrived within this time (gateway's view: queueing included).",
            "s",
            _q(
                "histogram_quantile(0.95, sum by (le) "
                f"(rate(appliance_time_to_first_token_seconds_bucket{RATE})))"
            ),
        )
    )
    d = d.with_panel(
        _stat(
            "Healthy replicas",
            "Replicas in the gateway's table that are healthy and fresh, every model.",
            "none",
            _q("sum(appliance_replicas_healthy)"),
        )
    )
    d = d.with_row(db.Row("Traffic"))
    d = d.with_panel(
        _ts(
            "Requests/s by model",
            "Who is busy: requests answered per second, by model.",
            "reqps",
            _q(f"sum by (model) (rate(appliance_requests_total{RATE}))", "{{model}}"),
        )
    )
    d = d.with_panel(
        _ts(
            "Tokens/s",
            "Prompt tokens read and completion tokens written per second, every model.",
            "short",
            _q(f"sum(rate(appliance_prompt_tokens_total{RATE}))", "prompt"),
            _q(f"sum(rate(appliance_completion_tokens_total{RATE}))", "completion"),
        )
    )
    d = d.with_row(db.Row("Latency"))
    d = d.with_panel(
        _ts(
            "Time to first token",
            "p50/p95/p99 from a request's arrival at the gateway to its first token.",
            "s",
            *_quantiles("appliance_time_to_first_token_seconds", ""),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Time per output token",
            "p50/p95/p99 of the time between tokens after the first.",
            "s",
            *_quantiles("appliance_time_per_output_token_seconds", ""),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "End-to-end latency",
            "p50/p95/p99 from arrival to the last byte of the answer.",
            "s",
            *_quantiles("appliance_request_duration_seconds", ""),
            width=8,
        )
    )
    d = d.with_row(db.Row("Errors and saturation"))
    d = d.with_panel(
        _ts(
            "Answers by status",
            "Requests per second by HTTP status: 4xx are the callers', 5xx the appliance's.",
            "reqps",
            _q(f"sum by (status) (rate(appliance_requests_total{RATE}))", "{{status}}"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Rejections by reason",
            "Requests refused before an engine saw them (rate limits, admission, queue "
            "full), by reason. Empty until the first rejection.",
            "reqps",
            _q(f"sum by (reason) (rate(appliance_rejections_total{RATE}))", "{{reason}}"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Cloud overflow",
            "Requests answered by a cloud provider, by provider and trigger, and requests a "
            "trigger would have sent that stayed local, by why (docs/cloud-overflow.md). "
            "Empty while overflow is off.",
            "reqps",
            _q(
                f"sum by (provider, reason) (rate(appliance_overflow_total{RATE}))",
                "{{provider}} {{reason}}",
            ),
            _q(
                f"sum by (reason) (rate(appliance_overflow_refused_total{RATE}))",
                "stayed: {{reason}}",
            ),
            width=12,
        )
    )
    d = d.with_panel(
        _ts(
            "Cloud spend per hour",
            "What cloud providers charge for overflowed requests, at the [burst] prices, "
            "per hour at the current rate. Empty while overflow is off.",
            "currencyUSD",
            _q(
                f"sum by (provider) (rate(appliance_cloud_spend_total{RATE})) * 3600",
                "{{provider}}",
            ),
            width=12,
        )
    )
    d = d.with_panel(
        _ts(
            "Queued and in flight",
            "Requests waiting for room on a replica and requests on the engines.",
            "short",
            _q("sum(appliance_replica_queued)", "queued"),
            _q("sum(appliance_replica_in_flight)", "in flight"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "KV cache usage by replica",
            "How full each engine's KV cache is; near 100% the engine queues or preempts.",
            "percentunit",
            _q(
                "max by (model, replica) (vllm:kv_cache_usage_perc) "
                "or max by (model, replica) (trtllm_kv_cache_utilization)",
                "{{model}} {{replica}}",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "GPU utilisation by node",
            "Mean utilisation of each node's GPUs (DCGM exporter).",
            "percent",
            _q("avg by (node) (DCGM_FI_DEV_GPU_UTIL)", "{{node}}"),
        )
    )
    return d


def model() -> db.Dashboard:
    sel = '{model=~"$model"}'
    d = _dashboard(
        "appliance-model",
        "Appliance model",
        "One model (or several): its traffic, latencies, tokens, replicas, queue and "
        "rejections, as the gateway sees them, beside the engines' own latencies.",
    ).with_variable(_variable("model", "Model", "label_values(appliance_replicas_healthy, model)"))
    d = d.with_panel(
        _ts(
            "Requests/s by status",
            "Answers per second by HTTP status.",
            "reqps",
            _q(
                f"sum by (model, status) (rate(appliance_requests_total{sel}{RATE}))",
                "{{model}} {{status}}",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Error ratio (5xx)",
            "Share of answers that were server errors.",
            "percentunit",
            _q(_error_ratio(sel, "model"), "{{model}}"),
        )
    )
    d = d.with_panel(
        _ts(
            "Time to first token (gateway)",
            "p50/p95/p99 from arrival to first token, queueing in the gateway included.",
            "s",
            *_quantiles("appliance_time_to_first_token_seconds", sel, "model"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Time per output token (gateway)",
            "p50/p95/p99 between tokens after the first.",
            "s",
            *_quantiles("appliance_time_per_output_token_seconds", sel, "model"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "End-to-end latency (gateway)",
            "p50/p95/p99 from arrival to the end of the answer.",
            "s",
            *_quantiles("appliance_request_duration_seconds", sel, "model"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Time to first token (engine)",
            "p50/p95/p99 as the engines measure it: the gap to the gateway's figure is "
            "queueing and the gateway's own time.",
            "s",
            *_quantiles("vllm:time_to_first_token_seconds", sel, "model"),
        )
    )
    d = d.with_panel(
        _ts(
            "Tokens/s",
            "Prompt and completion tokens per second.",
            "short",
            _q(
                f"sum by (model) (rate(appliance_prompt_tokens_total{sel}{RATE}))",
                "{{model}} prompt",
            ),
            _q(
                f"sum by (model) (rate(appliance_completion_tokens_total{sel}{RATE}))",
                "{{model}} completion",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Healthy replicas",
            "Replicas the gateway routes to.",
            "none",
            _q(f"sum by (model) (appliance_replicas_healthy{sel})", "{{model}}"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "In flight and queued by replica",
            "Requests on each replica and waiting for room on it.",
            "short",
            _q(f"sum by (replica) (appliance_replica_in_flight{sel})", "{{replica}} in flight"),
            _q(f"sum by (replica) (appliance_replica_queued{sel})", "{{replica}} queued"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Rejections and engine errors",
            "Requests refused, by reason, and requests that failed at an engine, by "
            "replica. Empty until the first one.",
            "reqps",
            _q(f"sum by (reason) (rate(appliance_rejections_total{sel}{RATE}))", "{{reason}}"),
            _q(
                f"sum by (replica) (rate(appliance_engine_errors_total{sel}{RATE}))",
                "engine errors {{replica}}",
            ),
            width=8,
        )
    )
    return d


def keys() -> db.Dashboard:
    sel = '{key=~"$key"}'
    d = _dashboard(
        "appliance-keys",
        "Appliance keys",
        "Per API key (by its name): requests, tokens, spend and errors.",
    ).with_variable(_variable("key", "Key", "label_values(appliance_requests_total, key)"))
    d = d.with_panel(
        _ts(
            "Requests/s by key",
            "Who calls: requests answered per second, by key.",
            "reqps",
            _q(f"sum by (key) (rate(appliance_requests_total{sel}{RATE}))", "{{key}}"),
        )
    )
    d = d.with_panel(
        _ts(
            "Tokens/s by key",
            "Prompt plus completion tokens per second, by key.",
            "short",
            _q(
                f"sum by (key) (rate(appliance_prompt_tokens_total{sel}{RATE}))"
                f" + sum by (key) (rate(appliance_completion_tokens_total{sel}{RATE}))",
                "{{key}}",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Spend per hour by key",
            "The rate of spend at the governance prices, per hour.",
            "currencyUSD",
            _q(f"sum by (key) (rate(appliance_spend_total{sel}{RATE})) * 3600", "{{key}}"),
        )
    )
    d = d.with_panel(
        _ts(
            "Non-2xx answers by key",
            "Answers per second that were not successes, by key and status: a key hitting "
            "its limits shows 429s here.",
            "reqps",
            _q(
                f'sum by (key, status) (rate(appliance_requests_total{{key=~"$key", '
                f'status!~"2.."}}{RATE}))',
                "{{key}} {{status}}",
            ),
        )
    )
    d = d.with_panel(
        _table(
            "Usage in the time range",
            "Requests, tokens and spend of each key on each model over the dashboard's time range.",
            "short",
            _q(
                f"sum by (key, model) (increase(appliance_requests_total{sel}[$__range]))",
                "requests",
                instant=True,
            ),
            _q(
                f"sum by (key, model) (increase(appliance_prompt_tokens_total{sel}[$__range]))",
                "prompt tokens",
                instant=True,
            ),
            _q(
                f"sum by (key, model) (increase(appliance_completion_tokens_total{sel}[$__range]))",
                "completion tokens",
                instant=True,
            ),
            _q(
                f"sum by (key, model) (increase(appliance_spend_total{sel}[$__range]))",
                "spend",
                instant=True,
            ),
            width=24,
        )
    )
    return d


def engines() -> db.Dashboard:
    sel = '{model=~"$model"}'
    d = _dashboard(
        "appliance-engines",
        "Appliance engines",
        "The engines' own metrics, per replica (labels model, replica, node, engine from "
        "the appliance's scrape targets): KV cache, running and waiting, preemptions, "
        "prefix cache, engine-side latencies. vLLM names, TensorRT-LLM's where they exist.",
    ).with_variable(_variable("model", "Model", 'label_values(up{job="appliance-engines"}, model)'))
    d = d.with_panel(
        _ts(
            "Engines up",
            "1 when Prometheus could scrape the replica's engine.",
            "none",
            _q('up{job="appliance-engines", model=~"$model"}', "{{model}} {{replica}}"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "KV cache usage",
            "Share of the KV cache in use; at 100% new requests wait and running ones may "
            "be preempted.",
            "percentunit",
            _q(
                f"max by (model, replica) (vllm:kv_cache_usage_perc{sel}) "
                f"or max by (model, replica) (trtllm_kv_cache_utilization{sel})",
                "{{model}} {{replica}}",
            ),
            width=16,
        )
    )
    d = d.with_panel(
        _ts(
            "Running and waiting requests",
            "Requests the engine is computing and those in its own queue.",
            "short",
            _q(
                f"sum by (model, replica) (vllm:num_requests_running{sel}) "
                f"or sum by (model, replica) (trtllm_num_requests_running{sel})",
                "{{model}} {{replica}} running",
            ),
            _q(
                f"sum by (model, replica) (vllm:num_requests_waiting{sel}) "
                f"or sum by (model, replica) (trtllm_num_requests_waiting{sel})",
                "{{model}} {{replica}} waiting",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Preemptions/s",
            "Requests the engine evicted from the KV cache to make room (recomputed "
            "later): a sign of a cache too small for the load.",
            "short",
            _q(
                f"sum by (model, replica) (rate(vllm:num_preemptions_total{sel}{RATE}))",
                "{{model}} {{replica}}",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Prefix cache hit ratio",
            "Share of prompt tokens found in the prefix cache.",
            "percentunit",
            _q(
                f"sum by (model) (rate(vllm:prefix_cache_hits_total{sel}{RATE}))\n"
                f"/ sum by (model) (rate(vllm:prefix_cache_queries_total{sel}{RATE}))",
                "{{model}}",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Engine tokens/s",
            "Prompt tokens processed and tokens generated per second, by replica.",
            "short",
            _q(
                f"sum by (model, replica) (rate(vllm:prompt_tokens_total{sel}{RATE}))",
                "{{model}} {{replica}} prompt",
            ),
            _q(
                f"sum by (model, replica) (rate(vllm:generation_tokens_total{sel}{RATE}))",
                "{{model}} {{replica}} generated",
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Engine time to first token",
            "p50/p95/p99 as the engine measures it.",
            "s",
            *_quantiles("vllm:time_to_first_token_seconds", sel, "model"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Engine inter-token latency",
            "p50/p95/p99 between generated tokens.",
            "s",
            *_quantiles("vllm:inter_token_latency_seconds", sel, "model"),
            width=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Engine queue time",
            "p50/p95/p99 of the time requests waited in the engine's own queue.",
            "s",
            *_quantiles("vllm:request_queue_time_seconds", sel, "model"),
            width=8,
        )
    )
    return d


def gpus() -> db.Dashboard:
    sel = '{node=~"$node"}'
    d = _dashboard(
        "appliance-gpus",
        "Appliance GPUs",
        "Every GPU of every GPU host, from NVIDIA's DCGM exporter (:9400 on each host).",
    ).with_variable(_variable("node", "Node", "label_values(DCGM_FI_DEV_GPU_UTIL, node)"))
    legend = "{{node}} GPU {{gpu}}"
    d = d.with_panel(
        _ts(
            "GPU utilisation",
            "Share of time a kernel was running, per GPU.",
            "percent",
            _q(f"DCGM_FI_DEV_GPU_UTIL{sel}", legend),
        )
    )
    d = d.with_panel(
        _ts(
            "Memory used",
            "Framebuffer memory used, per GPU (engines reserve most of it up front).",
            "decmbytes",
            _q(f"DCGM_FI_DEV_FB_USED{sel}", legend),
        )
    )
    d = d.with_panel(
        _ts(
            "Memory used (share)",
            "Framebuffer memory used over used plus free, per GPU.",
            "percentunit",
            _q(
                f"DCGM_FI_DEV_FB_USED{sel} / (DCGM_FI_DEV_FB_USED{sel} + DCGM_FI_DEV_FB_FREE{sel})",
                legend,
            ),
        )
    )
    d = d.with_panel(
        _ts(
            "Temperature",
            "GPU temperature, per GPU.",
            "celsius",
            _q(f"DCGM_FI_DEV_GPU_TEMP{sel}", legend),
        )
    )
    d = d.with_panel(
        _ts(
            "Power draw",
            "Power per GPU, and per node summed.",
            "watt",
            _q(f"DCGM_FI_DEV_POWER_USAGE{sel}", legend),
            _q(f"sum by (node) (DCGM_FI_DEV_POWER_USAGE{sel})", "{{node}} total"),
            width=24,
        )
    )
    return d


DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "overview": overview,
    "model": model,
    "keys": keys,
    "engines": engines,
    "gpus": gpus,
}


def render(name: str) -> str:
    built = DASHBOARDS[name]().build()
    # Stable panel ids, in order, so that links to a panel survive a rebuild.
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return json.dumps(built, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.observability.dashboards")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument(
        "--check", action="store_true", help="only say whether the files are up to date"
    )
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = args.out / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        names = ", ".join(str(p) for p in stale)
        print(
            f"error: {names} differ from what the module builds.\n"
            "Run `python -m appliance.observability.dashboards` and commit the result.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
