"""`appliance usage` and `appliance audit list|verify|prune`: who used what, and who did what."""

from __future__ import annotations

import csv
import io
import sys
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import typer

from appliance.audit import verify
from appliance.cli.common import config_of, console, print_json, print_table
from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError
from appliance.keys import describe_time, parse_duration
from appliance.state import State

audit_app = typer.Typer(
    help="The audit log: admin actions and refused requests, hash-chained.",
    no_args_is_help=True,
)


def _as_start(text: str, now: float) -> float:
    """'7d' back from now, or a date."""
    seconds = parse_duration(text)
    if seconds is not None:
        return now - seconds
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ApplianceError(
            f"cannot read {text!r} as a start",
            hint="Give a duration back from now (7d, 12h, 2w) or a date (2026-11-01).",
        ) from None


def _group(row: dict[str, Any], by: str) -> str:
    if by == "day":
        return time.strftime("%Y-%m-%d", time.localtime(row["ts"]))
    if by == "upstream":
        return str(row["upstream"] or "local")
    return str(row.get(by) or "(none)")


def _gpu_hours(config: ApplianceConfig, state: State, since: float, now: float) -> dict[str, float]:
    """GPU-hours each deployed model held within the window (GPUs x hours deployed)."""
    hours = {}
    for dep in state.deployments():
        plan = dep.plan
        gpus = plan.gpus_per_replica * plan.replicas
        held = max(0.0, now - max(since, dep.added_at)) / 3600
        hours[dep.model] = gpus * held
    return hours


def usage(
    ctx: typer.Context,
    by: str = typer.Option("key", "--by", help="Group by key, model, day or upstream."),
    since: str = typer.Option("7d", "--since", help="From how long ago (7d, 12h) or a date."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV on standard output."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Requests, tokens, latency and cost from the usage ledger.

    Local cost columns need prices in appliance.toml: [governance.prices.<model>]
    input_per_million / output_per_million, and [governance] gpu_hour_price (each model's
    GPU-hours are shared among the keys by their tokens). Requests answered by a cloud
    provider (cloud overflow) are counted apart, at what the provider charges ([burst]
    prices); --by upstream splits local from each provider.
    """
    if by not in ("key", "model", "day", "upstream"):
        raise ApplianceError(
            f"cannot group by {by!r}", hint="Use --by key, model, day or upstream."
        )
    config = config_of(ctx)
    state = State(config.state_db)
    now = time.time()
    start = _as_start(since, now)
    rows = state.usage_rows(since=start)
    prices = config.governance.prices
    groups: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                 "ttft_ms": [], "token_cost": 0.0, "gpu_cost": 0.0, "cloud_requests": 0,
                 "cloud_cost": 0.0}
    )  # fmt: skip
    tokens_by_model: dict[str, int] = defaultdict(int)
    for row in rows:
        # GPU-hours are shared among the tokens the GPUs made: not a provider's.
        if row["model"] and row["status"] == 200 and not row["upstream"]:
            tokens_by_model[row["model"]] += (row["prompt_tokens"] or 0) + (
                row["completion_tokens"] or 0
            )
    gpu_hours = _gpu_hours(config, state, start, now)
    gpu_price = config.governance.gpu_hour_price
    for row in rows:
        g = groups[_group(row, by)]
        g["requests"] += 1
        if row["status"] != 200:
            g["errors"] += 1
            continue
        prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
        g["prompt_tokens"] += prompt
        g["completion_tokens"] += completion
        if row["ttft_ms"] is not None:
            g["ttft_ms"].append(row["ttft_ms"])
        if row["upstream"]:
            g["cloud_requests"] += 1
            g["cloud_cost"] += row["cost"] or 0.0
            continue
        price = prices.get(row["model"] or "")
        if price is not None:
            g["token_cost"] += price.cost(prompt, completion)
        total = tokens_by_model.get(row["model"] or "", 0)
        if gpu_price is not None and total:
            share = (prompt + completion) / total
            g["gpu_cost"] += share * gpu_hours.get(row["model"], 0.0) * gpu_price
    table = []
    for name in sorted(groups):
        g = groups[name]
        ttft = sorted(g["ttft_ms"])
        table.append(
            {
                by: name,
                "requests": g["requests"],
                "errors": g["errors"],
                "prompt_tokens": g["prompt_tokens"],
                "completion_tokens": g["completion_tokens"],
                "ttft_p50_ms": round(ttft[len(ttft) // 2], 1) if ttft else None,
                "token_cost": round(g["token_cost"], 4),
                "gpu_cost": round(g["gpu_cost"], 4),
                "cloud_requests": g["cloud_requests"],
                "cloud_cost": round(g["cloud_cost"], 6),
            }
        )
    if as_json:
        print_json({"since": start, "until": now, "by": by, "rows": table})
        return
    if as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(table[0]) if table else [by])
        writer.writeheader()
        writer.writerows(table)
        sys.stdout.write(out.getvalue())
        return
    console.print(f"Usage since {describe_time(start)}, by {by}:")
    if not table:
        console.print("No requests in that time.")
        return
    headers = [by, "requests", "errors", "prompt tok", "completion tok", "TTFT p50"]
    if prices:
        headers.append("token cost")
    if gpu_price is not None:
        headers.append("GPU cost")
    cloud = any(r["cloud_requests"] for r in table)
    if cloud:
        headers += ["cloud requests", "cloud cost"]
    lines = []
    for r in table:
        line = [
            str(r[by]),
            str(r["requests"]),
            str(r["errors"]),
            f"{r['prompt_tokens']:,}",
            f"{r['completion_tokens']:,}",
            f"{r['ttft_p50_ms']:.0f} ms" if r["ttft_p50_ms"] is not None else "",
        ]
        if prices:
            line.append(f"{r['token_cost']:.4f}")
        if gpu_price is not None:
            line.append(f"{r['gpu_cost']:.4f}")
        if cloud:
            line += [str(r["cloud_requests"]), f"{r['cloud_cost']:.4f}"]
        lines.append(line)
    print_table(headers, lines)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    since: str = typer.Option("7d", "--since", help="From how long ago (7d, 12h) or a date."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Audit records: when, who, what, on what, from where."""
    records = State(config_of(ctx).state_db).audit_records(since=_as_start(since, time.time()))
    if as_json:
        print_json(records)
        return
    print_table(
        ["when", "who", "action", "target", "from"],
        [
            [describe_time(r["ts"]), r["actor"], r["action"], r["target"] or "", r["source"] or ""]
            for r in records
        ],
    )


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Check the audit log's hash chain: exit 1 at the first record that does not verify."""
    state = State(config_of(ctx).state_db)
    anchor, pruned = state.audit_anchor()
    verdict = verify(state.audit_records(), anchor)
    if not verdict.ok:
        raise ApplianceError(
            f"the audit log does not verify: record {verdict.first_bad} {verdict.reason}",
            hint="Records from there on were changed, removed or reordered after they were "
            "written; keep a copy of state.db for investigation.",
        )
    note = ""
    if pruned:
        note = f" ({pruned} older records pruned; the chain starts from their last hash)"
    console.print(f"The audit log verifies: {verdict.records} records{note}.")


@audit_app.command("prune")
def audit_prune(ctx: typer.Context) -> None:
    """Drop usage rows and audit records past their retention ([governance] in the config)."""
    config = config_of(ctx)
    now = time.time()
    gov = config.governance
    usage_rows, audit_records = State(config.state_db).prune(
        now - gov.usage_retention_days * 86400, now - gov.audit_retention_days * 86400
    )
    console.print(f"Pruned {usage_rows} usage rows and {audit_records} audit records.")
