"""The dashboards: the committed JSON is what the build script makes (so they never drift),
it reads back through Grafana's own types, and every query, parsed as PromQL, names only
metrics that something really exports: the gateway's contract (checked against a registry
that prometheus-client builds from it), the engines' lists read from real runs and source
(tests/fixtures/contracts/), DCGM's default counters. The alert rules are held to the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip(
    "grafana_foundation_sdk", reason="needs grafana-foundation-sdk: pip install -e '.[test]'"
)
pytest.importorskip("promql_parser", reason="needs promql-parser: pip install -e '.[test]'")

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import prometheus
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel
from prometheus_client.parser import text_string_to_metric_families

from appliance.observability import dashboards
from appliance.observability.contract import (
    GATEWAY_METRICS,
    LATENCY_BUCKETS,
    gateway_series,
)
from appliance.observability.prometheus import render_rules
from tests.promql_names import (
    allowed_names,
    contract_registry,
    dashboard_queries,
    engine_series,
    metric_names,
)

DASHBOARDS = sorted(dashboards.DASHBOARDS)
# Without the plugins, panel options and queries would read back as untyped bags.
register_default_plugins()


def _committed(name: str) -> dict[str, object]:
    return dict(json.loads((dashboards.OUT_DIR / f"{name}.json").read_text()))


@pytest.mark.parametrize("name", DASHBOARDS)
def test_the_committed_dashboard_is_what_the_script_builds(name: str) -> None:
    path = dashboards.OUT_DIR / f"{name}.json"
    assert path.read_text() == dashboards.render(name), (
        f"{path} is stale: run `python -m appliance.observability.dashboards` and commit it"
    )


def test_check_mode_reports_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dashboards.main(["--check"]) == 0
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "keys.json").write_text("{}")
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "keys.json" in err and "python -m appliance.observability.dashboards" in err


def test_every_directory_file_is_a_built_dashboard() -> None:
    assert sorted(p.stem for p in dashboards.OUT_DIR.glob("*.json")) == DASHBOARDS


@pytest.mark.parametrize("name", DASHBOARDS)
def test_the_json_reads_back_through_grafanas_types(name: str) -> None:
    data = _committed(name)
    typed = Dashboard.from_json(data)
    again = json.loads(json.dumps(typed, cls=JSONEncoder))
    assert again == data
    for panel in typed.panels or []:
        if isinstance(panel, Panel):
            # Decoded into the Prometheus query type and the panel's own option types.
            assert all(isinstance(t, prometheus.Dataquery) for t in panel.targets or [])
            assert not isinstance(panel.options, dict), panel.title
    uids = {dashboards.DATASOURCE_UID}
    panels = [p for p in data["panels"] if isinstance(p, dict)]  # type: ignore[attr-defined]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"]["uid"] in uids
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs) and all(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids


def test_uids_are_unique() -> None:
    uids = [_committed(name)["uid"] for name in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_every_query_names_only_exported_metrics() -> None:
    allowed = allowed_names()
    unknown = []
    count = 0
    for name in DASHBOARDS:
        for query in dashboard_queries(name, _committed(name)):
            count += 1
            for metric in metric_names(query.expr) - allowed:
                unknown.append(f"{query.dashboard} / {query.panel}: {metric}")
    assert count > 60
    assert unknown == []


def test_the_check_catches_a_name_no_one_exports() -> None:
    assert metric_names('sum(rate(vllm:kv_cache_usage_percent{model=~"$model"}[5m]))') - (
        allowed_names()
    ) == {"vllm:kv_cache_usage_percent"}
    # Names inside binary operators, `or`, aggregations and function arguments all count.
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[1m]))) / (b or c)") == {
        "a_bucket",
        "b",
        "c",
    }


def test_the_alert_rules_name_only_exported_metrics() -> None:
    allowed = allowed_names()
    for rule in render_rules()["groups"][0]["rules"]:
        assert metric_names(rule["expr"]) <= allowed, rule["alert"]


def test_each_dashboard_uses_its_source() -> None:
    """Overview and model read the gateway; engines the engines; GPUs DCGM only."""
    by_dashboard = {
        name: set().union(
            *(metric_names(q.expr) for q in dashboard_queries(name, _committed(name)))
        )
        for name in DASHBOARDS
    }
    assert by_dashboard["gpus"] <= {n for n in allowed_names() if n.startswith("DCGM_")}
    assert "vllm:kv_cache_usage_perc" in by_dashboard["engines"]
    assert {"vllm:num_preemptions_total", "vllm:num_requests_waiting"} <= by_dashboard["engines"]
    assert "appliance_spend_total" in by_dashboard["keys"]
    assert "appliance_time_to_first_token_seconds_bucket" in by_dashboard["overview"]
    assert engine_series() & by_dashboard["model"]


def test_the_gateway_contract_is_what_prometheus_client_exports() -> None:
    """A registry built from the contract, as the gateway builds its own: the sample names
    it exposes are the ones the dashboards are checked against."""
    registry, metrics = contract_registry()
    for metric in GATEWAY_METRICS:
        made = metrics[metric.name]
        child = made.labels(*["x"] * len(metric.labels)) if metric.labels else made
        if metric.kind == "counter":
            child.inc()
        elif metric.kind == "gauge":
            child.set(1)
        else:
            child.observe(0.1)
    from prometheus_client import generate_latest

    exposed = {
        sample.name
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    assert exposed == gateway_series()
    assert LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 60.0


def test_the_contract_is_the_gateways_own_registry() -> None:
    """Names, types, labels and buckets: what the gateway's /metrics really exports."""
    from appliance.gateway.metrics import BUCKETS, GatewayMetrics
    from appliance.gateway.replicas import ReplicaTable

    real = GatewayMetrics(ReplicaTable())
    families = {f.name: f.type for f in real.registry().collect()}
    # prometheus-client names a counter's family without its _total.
    assert families == {
        m.name.removesuffix("_total") if m.kind == "counter" else m.name: m.kind
        for m in GATEWAY_METRICS
    }
    # The label names live only on the metric objects (prometheus-client keeps no public view).
    by_name = {
        metric._name: metric._labelnames
        for metric in vars(real).values()
        if hasattr(metric, "_labelnames")
    }
    for m in GATEWAY_METRICS:
        base = m.name.removesuffix("_total") if m.kind == "counter" else m.name
        if base in by_name:
            assert by_name[base] == m.labels, m.name
    assert len(by_name) >= 10
    assert BUCKETS == LATENCY_BUCKETS
