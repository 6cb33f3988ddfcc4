"""Reading dashboards and rules the way Prometheus would: every query, parsed, and the metric
names it selects. Shared by the dashboards' contract test and the live Prometheus test."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.observability.contract import PROMETHEUS_SERIES, dcgm_series, gateway_series

CONTRACTS = Path(__file__).resolve().parent / "fixtures" / "contracts"
DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "playbooks/roles/monitoring/files/dashboards"
# Grafana's own variables, replaced by what Grafana would send for a 1-hour range.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$", re.S)


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    expr: str


def dashboard_queries(name: str, data: dict[str, Any]) -> list[Query]:
    """Every panel target's expression and every query variable's selector."""
    found = []
    for panel in data.get("panels", []):
        for target in panel.get("targets", []):
            found.append(Query(name, panel["title"], target["expr"]))
    for var in data.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            match = _LABEL_VALUES.match(var["query"])
            assert match, f"{name}: variable {var['name']}: not label_values(...)"
            found.append(Query(name, f"variable {var['name']}", match.group(1)))
    return found


def concrete(expr: str, values: dict[str, str] | None = None) -> str:
    """The expression with Grafana's variables filled in ($model etc. with `values`)."""
    for var, value in {**GRAFANA_VARS, **(values or {})}.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, read from its parse tree (promql-parser, of
    the test extra: callers skip without it)."""
    import promql_parser

    # Nodes that hold one expression.
    wrappers = (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, wrappers):
            walk(node.expr)
        elif not isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral):
            raise AssertionError(f"unexpected {type(node).__name__} in {expr!r}")

    walk(promql_parser.parse(concrete(expr, {"$model": ".*", "$key": ".*", "$node": ".*"})))
    return names


def _with_suffixes(names: set[str]) -> set[str]:
    # The engines' lists give histograms by their base name.
    return names | {f"{n}{s}" for n in names for s in ("_bucket", "_sum", "_count")}


def engine_series() -> set[str]:
    vllm = {
        line.strip()
        for line in (CONTRACTS / "vllm-0.32-metrics.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    trtllm: set[str] = set()
    for value in json.loads((CONTRACTS / "trtllm-serve.json").read_text())["metrics"].values():
        if isinstance(value, list):
            trtllm |= set(value)
    return _with_suffixes(vllm) | _with_suffixes(trtllm)


def allowed_names() -> set[str]:
    return gateway_series() | engine_series() | dcgm_series() | set(PROMETHEUS_SERIES)


def contract_registry() -> tuple[Any, dict[str, Any]]:
    """A prometheus-client registry with every gateway metric of the contract, built as the
    gateway builds its own (the stand-in for the gateway's /metrics until that lands), and
    its metrics by contract name."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from appliance.observability.contract import GATEWAY_METRICS, LATENCY_BUCKETS

    registry = CollectorRegistry()
    metrics: dict[str, Any] = {}
    for m in GATEWAY_METRICS:
        if m.kind == "counter":
            # prometheus-client appends _total itself.
            made: Any = Counter(m.name.removesuffix("_total"), m.help, m.labels, registry=registry)
        elif m.kind == "gauge":
            made = Gauge(m.name, m.help, m.labels, registry=registry)
        else:
            made = Histogram(m.name, m.help, m.labels, buckets=LATENCY_BUCKETS, registry=registry)
        metrics[m.name] = made
    return registry, metrics
