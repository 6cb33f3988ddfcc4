"""prometheus.yml and the alert rules, checked by Debian's promtool (installed when missing,
as the installer tests install their tools; skipped with the reason otherwise): the config
with every job, the engines' file_sd file the supervisor writes, and the rules by unit tests
with input series (promtool test rules)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from appliance.installer.inventory import parse_install
from appliance.observability.contract import PROMETHEUS_SERIES, gateway_series
from appliance.observability.prometheus import (
    AlertTargets,
    GpuHost,
    ScrapeSettings,
    dump,
    gpu_hosts_of,
    main,
    render_config,
    render_rules,
)
from appliance.observability.targets import engine_targets, write_engine_targets
from tests.conftest import replica_state
from tests.installer.testhosts import require_tools
from tests.liveprom import promql, running_prometheus
from tests.promql_names import (
    DASHBOARD_DIR,
    concrete,
    contract_registry,
    dashboard_queries,
    metric_names,
)


@pytest.fixture(scope="module")
def promtool() -> str:
    require_tools("promtool")
    return "promtool"


def _check(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_config_with_every_job_passes_promtool(promtool: str, tmp_path: Path) -> None:
    engines = tmp_path / "run" / "prometheus" / "engines.json"
    replica = replica_state(model="m", url="http://10.0.0.12:40001", node="10.0.0.12")
    write_engine_targets(engines, engine_targets([replica]))
    (tmp_path / "key").write_text("sk-test\n")
    (tmp_path / "ca.pem").write_text("")
    rules = tmp_path / "appliance-alerts.yml"
    rules.write_text(dump(render_rules()))
    settings = ScrapeSettings(
        gateway="10.0.0.11:443",
        gateway_scheme="https",
        credentials_file=tmp_path / "key",
        ca_file=tmp_path / "ca.pem",
        engines_file=engines,
        rules_files=[rules],
        gpu_hosts=[GpuHost("gpu01", "10.0.0.11"), GpuHost("gpu02", "fd00::2")],
    )
    config = render_config(settings)
    path = tmp_path / "prometheus.yml"
    path.write_text(dump(config))
    proc = _check(promtool, "check", "config", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["appliance-gateway"]["authorization"] == {
        "type": "Bearer",
        "credentials_file": str(tmp_path / "key"),
    }
    assert jobs["appliance-gateway"]["tls_config"] == {"ca_file": str(tmp_path / "ca.pem")}
    assert jobs["dcgm"]["static_configs"][1] == {
        "targets": ["[fd00::2]:9400"],
        "labels": {"node": "gpu02"},
    }


def test_a_broken_engines_file_is_what_promtool_rejects(promtool: str, tmp_path: Path) -> None:
    """The check above means something: promtool reads the file_sd file itself."""
    engines = tmp_path / "engines.json"
    engines.write_text('[{"targets": "not a list"}]')
    path = tmp_path / "prometheus.yml"
    path.write_text(dump(render_config(ScrapeSettings(gateway="x:1", engines_file=engines))))
    assert _check(promtool, "check", "config", str(path)).returncode != 0


def test_gpu_hosts_come_from_the_inventory() -> None:
    install = parse_install(
        {
            "hosts": [
                {"name": "gpu01", "address": "10.0.0.11"},
                {"name": "cpu01", "address": "10.0.0.21",
                 "vars": {"preflight_require_gpus": False}},
                {"name": "gpu02"},
            ]
        },
        Path("install.toml"),
    )  # fmt: skip
    assert gpu_hosts_of(install) == [GpuHost("gpu01", "10.0.0.11"), GpuHost("gpu02", "gpu02")]


def test_the_module_prints_a_config_and_says_how_to_give_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(f'home = "{tmp_path}"\n[gateway]\nport = 8123\n')
    assert main(["--config", str(config), "--gpu-host", "gpu01=10.0.0.11"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    gateway = printed["scrape_configs"][0]
    assert gateway["static_configs"] == [{"targets": ["127.0.0.1:8123"]}]
    assert printed["scrape_configs"][1]["file_sd_configs"][0]["files"] == [
        str(tmp_path / "run" / "prometheus" / "engines.json")
    ]
    assert main(["--config", str(config), "--engines-file", "/srv/t/engines.json"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["scrape_configs"][1]["file_sd_configs"][0]["files"] == ["/srv/t/engines.json"]
    assert main(["--config", str(config), "--gpu-host", "gpu01"]) == 1
    err = capsys.readouterr().err
    assert "NAME=ADDRESS" in err and "--gpu-host gpu01=10.0.0.11" in err
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.observability.prometheus", "--rules"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout) == render_rules()


def test_the_rules_pass_promtool_check(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(dump(render_rules()))
    proc = _check(promtool, "check", "rules", str(rules))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 rules found" in proc.stdout


def _annotations(alert: str, labels: dict[str, str], value: str) -> dict[str, str]:
    """The rule's annotations as Prometheus should expand them for these labels and value."""
    [rule] = [r for r in render_rules()["groups"][0]["rules"] if r["alert"] == alert]
    out = {}
    for key, text in rule["annotations"].items():
        for name, label in labels.items():
            text = text.replace(f"{{{{ $labels.{name} }}}}", label)
        for fn in ("humanizePercentage", "humanizeDuration"):
            text = text.replace(f"{{{{ $value | {fn} }}}}", value)
        out[key] = text
    return out


def _alert(alert: str, labels: dict[str, str], value: str, severity: str) -> dict[str, Any]:
    return {
        "exp_labels": {**labels, "severity": severity},
        "exp_annotations": _annotations(alert, labels, value),
    }


def test_the_rules_fire_on_the_series_they_are_for(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(dump(render_rules(AlertTargets(ttft_p95_s=2.0))))
    # TTFT of "slow" falls in (2.5 s, 5 s]: p95 4.875 s; of "fast" below 0.5 s.
    ttft = [
        (f'appliance_time_to_first_token_seconds_bucket{{model="{m}",upstream="local",le="{le}"}}',
         f"0+{n}x30")
        for m, counts in (("slow", (0, 0, 0, 10, 10)), ("fast", (10, 10, 10, 10, 10)))
        for le, n in zip(("0.5", "1", "2.5", "5", "+Inf"), counts, strict=True)
    ]  # fmt: skip
    series = [
        # "down" loses its last replica at minute 1; "up" keeps one.
        ('appliance_replicas_healthy{model="down"}', "1 0x30"),
        ('appliance_replicas_healthy{model="up"}', "1x30"),
        *ttft,
        # 10% of "flaky"'s requests fail with 502; "steady" has none.
        ('appliance_requests_total{model="flaky",key="k",status="200",upstream="local"}',
         "0+90x30"),
        ('appliance_requests_total{model="flaky",key="k",status="502",upstream="local"}',
         "0+10x30"),
        ('appliance_requests_total{model="steady",key="k",status="200",upstream="local"}',
         "0+50x30"),
        ('vllm:kv_cache_usage_perc{model="full",replica="r1",engine="vllm"}', "0.99x30"),
        ('vllm:kv_cache_usage_perc{model="full",replica="r2",engine="vllm"}', "0.5x30"),
        ('trtllm_kv_cache_utilization{model="trt",replica="r3",engine="trtllm"}', "0.97x30"),
    ]  # fmt: skip
    no_replica = "ApplianceModelWithoutHealthyReplica"
    ttft_high = "ApplianceTimeToFirstTokenHigh"
    errors = "ApplianceErrorRateHigh"
    kv = "ApplianceKVCacheSaturated"
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    # Not before the condition has held for its `for` duration.
                    {"eval_time": "2m", "alertname": no_replica, "exp_alerts": []},
                    {"eval_time": "4m", "alertname": no_replica,
                     "exp_alerts": [_alert(no_replica, {"model": "down"}, "", "critical")]},
                    {"eval_time": "8m", "alertname": ttft_high, "exp_alerts": []},
                    {"eval_time": "20m", "alertname": ttft_high,
                     "exp_alerts": [_alert(ttft_high, {"model": "slow"}, "4.875s", "warning")]},
                    {"eval_time": "3m", "alertname": errors, "exp_alerts": []},
                    {"eval_time": "12m", "alertname": errors,
                     "exp_alerts": [_alert(errors, {"model": "flaky"}, "10%", "warning")]},
                    {"eval_time": "5m", "alertname": kv, "exp_alerts": []},
                    {"eval_time": "15m", "alertname": kv, "exp_alerts": [
                        _alert(kv, {"model": "full", "replica": "r1"}, "99%", "warning"),
                        _alert(kv, {"model": "trt", "replica": "r3"}, "97%", "warning"),
                    ]},
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = _check(promtool, "test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_a_rule_unit_test_can_fail(promtool: str, tmp_path: Path) -> None:
    """Guard for the test above: an alert that should not fire makes promtool fail."""
    rules = tmp_path / "rules.yml"
    rules.write_text(dump(render_rules()))
    tests = {
        "rule_files": [str(rules)],
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": 'appliance_replicas_healthy{model="down"}',
                              "values": "0x10"}],
            "alert_rule_test": [{"eval_time": "5m",
                                 "alertname": "ApplianceModelWithoutHealthyReplica",
                                 "exp_alerts": []}],
        }],
    }  # fmt: skip
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests))
    assert _check(promtool, "test", "rules", str(path)).returncode != 0


class _StandInGateway:
    """The gateway's /metrics as the contract describes it, behind the admin key, with
    traffic: what the real Prometheus scrapes until the gateway's own /metrics lands."""

    def __init__(self, key: str) -> None:
        self.registry, self.metrics = contract_registry()
        self.authorized = 0
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                elif self.headers.get("Authorization") != f"Bearer {key}":
                    outer.refused += 1
                    self.send_error(401)
                else:
                    outer.authorized += 1
                    body = generate_latest(outer.registry)
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.server.serve_forever, daemon=True),
            threading.Thread(target=self._traffic, daemon=True),
        ]

    def _traffic(self) -> None:
        m = self.metrics
        m["appliance_replicas_healthy"].labels("tiny").set(1)
        m["appliance_replicas_healthy"].labels("down").set(0)
        n = 0
        while not self.stop.wait(0.05):
            n += 1
            # One answer in five is a 502 (the error-rate alert's 5% is exceeded); bob's
            # requests are refused by his rate limit.
            status = "502" if n % 5 == 0 else "200"
            m["appliance_requests_total"].labels("tiny", "alice", status, "local").inc()
            m["appliance_requests_total"].labels("tiny", "bob", "429", "local").inc()
            m["appliance_rejections_total"].labels("tiny", "rate_limited").inc()
            if status == "502":
                m["appliance_engine_errors_total"].labels("tiny", "r1").inc()
            for name, seconds in (
                ("appliance_time_to_first_token_seconds", 0.02 * (1 + n % 7)),
                ("appliance_time_per_output_token_seconds", 0.005 * (1 + n % 3)),
                ("appliance_request_duration_seconds", 0.5 * (1 + n % 5)),
            ):
                m[name].labels("tiny", "local").observe(seconds)
            m["appliance_prompt_tokens_total"].labels("tiny", "alice").inc(12)
            m["appliance_completion_tokens_total"].labels("tiny", "alice").inc(30)
            m["appliance_spend_total"].labels("tiny", "alice").inc(0.0004)
            # A gateway with cloud overflow on (docs/cloud-overflow.md).
            m["appliance_overflow_total"].labels("tiny", "claude", "latency").inc()
            m["appliance_overflow_refused_total"].labels("tiny", "data_class").inc()
            m["appliance_cloud_spend_total"].labels("claude", "tiny", "alice").inc(0.002)
            m["appliance_replica_in_flight"].labels("tiny", "r1").set(n % 4)
            m["appliance_replica_queued"].labels("tiny", "r1").set(n % 2)

    def __enter__(self) -> _StandInGateway:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_real_prometheus_answers_every_gateway_query_of_the_dashboards(
    tmp_path: Path,
) -> None:
    """Debian's Prometheus scrapes the stand-in with the generated config (admin key from a
    credentials_file), and every dashboard query over gateway metrics returns data; the
    rules evaluate, and those whose condition holds are pending."""
    pytest.importorskip("promql_parser", reason="needs promql-parser: pip install -e '.[test]'")
    key = "sk-prometheus-test"
    (tmp_path / "gateway.key").write_text(key + "\n")
    rules = tmp_path / "rules.yml"
    rules.write_text(dump(render_rules()))
    engines = tmp_path / "engines.json"
    write_engine_targets(engines, [])
    with _StandInGateway(key) as gateway:
        settings = ScrapeSettings(
            gateway=f"127.0.0.1:{gateway.port}",
            credentials_file=tmp_path / "gateway.key",
            engines_file=engines,
            rules_files=[rules],
            scrape_interval="1s",
        )
        config = tmp_path / "prometheus.yml"
        config.write_text(dump(render_config(settings)))
        with running_prometheus(config, tmp_path) as url:
            up = 'up{job="appliance-gateway"}'
            assert _wait(lambda: [r["value"][1] for r in promql(url, up)] == ["1"], 30)
            time.sleep(4)  # enough scrapes for every rate
            fill = {"$model": "tiny", "$key": ".*", "$node": ".*", "$__range": "1m"}
            checked, empty = 0, []
            for path in sorted(DASHBOARD_DIR.glob("*.json")):
                for query in dashboard_queries(path.stem, json.loads(path.read_text())):
                    names = metric_names(query.expr)
                    if not names & gateway_series() or names - gateway_series() - PROMETHEUS_SERIES:
                        continue  # engines' and DCGM's: tests/test_e2e.py, GPU hosts
                    checked += 1
                    result = promql(url, concrete(query.expr, fill))
                    if not result:
                        empty.append(f"{path.stem} / {query.panel}: {query.expr}")
                        continue
                    values = ", ".join(r["value"][1] for r in result[:3])
                    print(f"{path.stem} / {query.panel}: {concrete(query.expr, fill)} => {values}")
            assert empty == [] and checked >= 40, (checked, empty)
            ratio = promql(url, concrete(_error_ratio_query(), fill))
            assert 0.05 < float(ratio[0]["value"][1]) < 0.35, ratio
            pending = {
                (a["labels"]["alertname"], a["labels"].get("model"))
                for a in httpx.get(url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            }
            assert ("ApplianceModelWithoutHealthyReplica", "down") in pending
            assert ("ApplianceErrorRateHigh", "tiny") in pending
            assert ("ApplianceModelWithoutHealthyReplica", "tiny") not in pending
    assert gateway.authorized >= 3 and gateway.refused == 0


def _error_ratio_query() -> str:
    [panel] = [
        p
        for p in json.loads((DASHBOARD_DIR / "model.json").read_text())["panels"]
        if p["title"] == "Error ratio (5xx)"
    ]
    return str(panel["targets"][0]["expr"])
