"""prometheus.yml and the alert rules, checked by Debian's promtool (installed when missing,
as the installer tests install their tools; skipped with the reason otherwise): the config
with every job, the engines' file_sd file the supervisor writes, and the rules by unit tests
with input series (promtool test rules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.installer.inventory import parse_install
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
from tests.installer.testhosts import require_tools


@pytest.fixture(scope="module")
def promtool() -> str:
    require_tools("promtool")
    return "promtool"


def _check(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_config_with_every_job_passes_promtool(promtool: str, tmp_path: Path) -> None:
    engines = tmp_path / "run" / "prometheus" / "engines.json"
    replica = {"replica_id": "r1", "model": "m", "engine": "vllm", "url": "http://10.0.0.12:40001",
               "node": "10.0.0.12", "healthy": True, "fresh": True}  # fmt: skip
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
