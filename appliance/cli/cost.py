"""`appliance cost`: on-prem against a cloud API, as a table, a chart file and JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from appliance.catalog import load_catalog
from appliance.cli.common import config_of, console, print_json, print_table
from appliance.control.cluster import given_or_viewed
from appliance.cost import (
    CostInputs,
    PlannedThroughput,
    analyze,
    format_tokens,
    format_usd,
    load_inputs,
    planned_throughput,
)
from appliance.cost import parse_tokens as _parse_tokens
from appliance.cost import parse_workload as _parse_workload
from appliance.costchart import summary_lines, write_html
from appliance.errors import PlanError

DEFAULT_CHART = Path("appliance-cost.html")

# How each input is spelled on the command line, so errors name what the person typed.
FLAGS = {
    "volume_tokens_month": "--volume",
    "mean_input_tokens": "--workload",
    "mean_output_tokens": "--workload",
    "price_input_usd_per_mtok": "--price-in",
    "price_output_usd_per_mtok": "--price-out",
    "throughput_tok_s": "--throughput",
    "utilization": "--utilization",
    "nodes": "--nodes",
    "node_capex_usd": "--node-price",
    "amortization_months": "--amortize",
    "node_power_kw": "--node-kw",
    "idle_power_fraction": "--idle-power",
    "pue": "--pue",
    "power_usd_per_kwh": "--power-price",
    "colo_usd_per_kw_month": "--colo",
    "cooling_usd_per_node_month": "--cooling",
    "staff_fte": "--staff-fte",
    "staff_loaded_usd_year": "--staff-cost",
    "other_usd_month": "--other",
}


def _default(field: str) -> str:
    value = CostInputs.model_fields[field].default
    if field == "volume_tokens_month":
        return format_tokens(value)
    return f"{value:,.6g}"


def _help(text: str, field: str) -> str:
    return f"{text} Default: {_default(field)}."


def cost(
    ctx: typer.Context,
    inputs_file: Path | None = typer.Option(
        None,
        "--inputs",
        help="TOML file with any inputs (keys as in docs/cost.md); flags override it.",
        dir_okay=False,
    ),
    volume: str | None = typer.Option(
        None,
        "--volume",
        help=_help("Tokens per month, input plus output: 5B, 300M, 2.5e9.", "volume_tokens_month"),
    ),
    workload: str | None = typer.Option(
        None,
        "--workload",
        metavar="IN:OUT",
        help="Mean input:output tokens per request; weights the two prices and the "
        f"throughput. Default: {_default('mean_input_tokens')}:"
        f"{_default('mean_output_tokens')}.",
    ),
    price_in: float | None = typer.Option(
        None,
        "--price-in",
        help=_help("Cloud USD per 1M input tokens (default: GPT-4.1).", "price_input_usd_per_mtok"),
    ),
    price_out: float | None = typer.Option(
        None,
        "--price-out",
        help=_help("Cloud USD per 1M output tokens.", "price_output_usd_per_mtok"),
    ),
    throughput: float | None = typer.Option(
        None,
        "--throughput",
        help=_help(
            "Output tokens/s of the whole deployment at the workload shape (planner or "
            "measured; default: Llama 3.3 70B FP8 on 8xH100).",
            "throughput_tok_s",
        ),
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Catalog model to take the throughput from: the planner's prediction for it on "
        "--gpus at --workload, all replicas together. --throughput overrides it.",
    ),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        help="GPUs to plan --model for, as `appliance plan --gpus` takes them: COUNTxTYPE or "
        "NODESxCOUNTxTYPE, '+' between node kinds (8xH100-80GB, 2x8xH200). Default: the "
        "GPUs `appliance plan` plans for (the Ray cluster's, or this host's).",
    ),
    utilization: float | None = typer.Option(
        None,
        "--utilization",
        help=_help("Average fraction of that throughput used, 0-1.", "utilization"),
    ),
    nodes: int | None = typer.Option(
        None,
        "--nodes",
        help=_help("Nodes the throughput is for; more are bought if the volume needs.", "nodes"),
    ),
    node_price: float | None = typer.Option(
        None, "--node-price", help=_help("USD per node, installed.", "node_capex_usd")
    ),
    amortize: int | None = typer.Option(
        None,
        "--amortize",
        help=_help("Months the hardware is written off over.", "amortization_months"),
    ),
    node_kw: float | None = typer.Option(
        None, "--node-kw", help=_help("Node power at full load, kW.", "node_power_kw")
    ),
    idle_power: float | None = typer.Option(
        None,
        "--idle-power",
        help=_help("Idle power as a fraction of full load.", "idle_power_fraction"),
    ),
    pue: float | None = typer.Option(
        None, "--pue", help=_help("Power usage effectiveness (cooling energy is in it).", "pue")
    ),
    power_price: float | None = typer.Option(
        None, "--power-price", help=_help("Electricity, USD per kWh.", "power_usd_per_kwh")
    ),
    colo: float | None = typer.Option(
        None,
        "--colo",
        help=_help("Rack/colo, USD per kW reserved per month.", "colo_usd_per_kw_month"),
    ),
    cooling: float | None = typer.Option(
        None,
        "--cooling",
        help=_help(
            "Cooling paid apart from PUE, USD per node per month.", "cooling_usd_per_node_month"
        ),
    ),
    staff_fte: float | None = typer.Option(
        None, "--staff-fte", help=_help("Engineers (FTE) the deployment takes.", "staff_fte")
    ),
    staff_cost: float | None = typer.Option(
        None,
        "--staff-cost",
        help=_help("Loaded USD per engineer per year.", "staff_loaded_usd_year"),
    ),
    other: float | None = typer.Option(
        None, "--other", help=_help("Anything else, USD per month.", "other_usd_month")
    ),
    chart: Path = typer.Option(
        DEFAULT_CHART, "--chart", help="Where to write the HTML chart.", dir_okay=False
    ),
    no_chart: bool = typer.Option(False, "--no-chart", help="Do not write the chart."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compare serving on-prem with paying a cloud API: monthly cost, cost per 1M tokens,
    the volume where on-prem becomes cheaper and the months until the hardware pays back."""
    overrides: dict[str, Any] = {
        "price_input_usd_per_mtok": price_in,
        "price_output_usd_per_mtok": price_out,
        "throughput_tok_s": throughput,
        "utilization": utilization,
        "nodes": nodes,
        "node_capex_usd": node_price,
        "amortization_months": amortize,
        "node_power_kw": node_kw,
        "idle_power_fraction": idle_power,
        "pue": pue,
        "power_usd_per_kwh": power_price,
        "colo_usd_per_kw_month": colo,
        "cooling_usd_per_node_month": cooling,
        "staff_fte": staff_fte,
        "staff_loaded_usd_year": staff_cost,
        "other_usd_month": other,
    }
    if volume is not None:
        try:
            overrides["volume_tokens_month"] = _parse_tokens(volume)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--volume") from None
    if workload is not None:
        try:
            tokens_in, tokens_out = _parse_workload(workload)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--workload") from None
        overrides["mean_input_tokens"] = tokens_in
        overrides["mean_output_tokens"] = tokens_out

    if gpus is not None and model is None:
        raise typer.BadParameter(
            "only used with --model, to plan that model's throughput", param_hint="--gpus"
        )

    loaded = load_inputs(inputs_file, overrides, FLAGS)
    planned = None
    if model is not None and throughput is None:
        planned = _plan(ctx, model, gpus, loaded)
        # The planned GPUs are the deployment: their nodes, unless --nodes says otherwise.
        loaded = loaded.with_throughput(planned.tok_s, None if nodes is not None else planned.nodes)
    report = analyze(loaded)
    chart_path = None if no_chart else write_html(report, chart)

    if as_json:
        planner = {"planner": planned.to_dict()} if planned else {}
        print_json(
            {**report.to_dict(), **planner, "chart": str(chart_path) if chart_path else None}
        )
        return

    if planned is not None:
        console.print(planned.describe())
        console.print()

    i = report.inputs
    parts = report.onprem
    parts_rows = [
        (
            f"hardware ({report.nodes} node{'s' if report.nodes > 1 else ''} / "
            f"{i.amortization_months} mo)",
            parts.hardware,
        ),
        (f"power (PUE {i.pue:g}, ${i.power_usd_per_kwh:g}/kWh)", parts.power),
        (f"rack/colo (${i.colo_usd_per_kw_month:g}/kW/mo)", parts.colo),
        ("cooling (apart from PUE)", parts.cooling),
        (f"staff ({i.staff_fte:g} FTE)", parts.staff),
        ("other", parts.other),
    ]
    rows: list[list[str | Text]] = [[label, format_usd(value), ""] for label, value in parts_rows]
    rows.append(
        [
            f"API ({format_usd(i.price_input_usd_per_mtok)} in / "
            f"{format_usd(i.price_output_usd_per_mtok)} out per 1M)",
            "",
            format_usd(report.cloud_usd_month),
        ]
    )
    bold = "bold"
    rows.append(
        [
            Text("total", style=bold),
            Text(format_usd(parts.total), style=bold),
            Text(format_usd(report.cloud_usd_month), style=bold),
        ]
    )
    per_mtok = report.onprem_usd_per_mtok
    rows.append(
        [
            "per 1M tokens at this volume",
            format_usd(per_mtok) if per_mtok is not None else "-",
            format_usd(report.cloud_usd_per_mtok),
        ]
    )
    print_table(
        [f"per month at {format_tokens(i.volume_tokens_month)} tokens", "on-prem", "cloud API"],
        rows,
    )
    console.print()
    for line in summary_lines(report):
        console.print(line)
    if chart_path is not None:
        console.print(f"Chart: {chart_path}")


def _plan(ctx: typer.Context, model: str, gpus: str | None, i: CostInputs) -> PlannedThroughput:
    """The planner's throughput for `model` on --gpus (default: the cluster's GPUs)."""
    config = config_of(ctx)
    entry = load_catalog(config.catalog).get(model)
    try:
        cluster = given_or_viewed(config, gpus)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpus") from None
    try:
        return planned_throughput(entry, cluster, i, config.engines.memory_fractions())
    except PlanError as exc:
        if gpus is None and cluster.total_gpus == 0:
            hint = "Name the GPUs to price with --gpus, e.g. --gpus 8xH100-80GB."
            raise PlanError(exc.message, hint=hint) from None
        raise
