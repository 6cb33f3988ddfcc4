"""prometheus.yml and the appliance's alert rules, rendered from the configuration.

Three jobs, each with the labels the dashboards group by:

    appliance-gateway   the gateway's /metrics on its own port, with an admin-scope API key
                        (authorization.credentials_file); the internal CA for HTTPS
    appliance-engines   every healthy replica's engine, from the file the supervisor writes
                        (file_sd: <home>/run/prometheus/engines.json), labels model,
                        replica, node, engine
    dcgm                NVIDIA's DCGM exporter on each GPU host (:9400), label node

The installer runs this module on the head (`python -m appliance.observability.prometheus`)
with the GPU hosts its probes found; `render_config` takes the same facts from Python.
Every file it writes is checked with `promtool` before it is put in place (the role does
that, the tests too).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.config import ApplianceConfig, load_config
from appliance.errors import ApplianceError, ConfigError
from appliance.installer.settings import InstallConfig
from appliance.observability.targets import engine_targets_path

DCGM_PORT = 9400
GATEWAY_JOB = "appliance-gateway"
ENGINES_JOB = "appliance-engines"
DCGM_JOB = "dcgm"


@dataclass(frozen=True)
class GpuHost:
    name: str
    address: str


@dataclass(frozen=True)
class AlertTargets:
    """Thresholds of the alert rules (role variables monitoring_alert_*)."""

    ttft_p95_s: float = 2.0
    error_ratio: float = 0.05
    kv_cache_usage: float = 0.95
    # How long a condition must hold before the alert fires.
    no_replica_for: str = "2m"
    slow_for: str = "10m"


@dataclass
class ScrapeSettings:
    gateway: str  # host:port
    gateway_scheme: str = "http"
    credentials_file: Path | None = None
    ca_file: Path | None = None
    engines_file: Path = Path("engines.json")
    rules_files: list[Path] = field(default_factory=list)
    gpu_hosts: list[GpuHost] = field(default_factory=list)
    scrape_interval: str = "15s"


def gpu_hosts_of(install: InstallConfig) -> list[GpuHost]:
    """The inventory's GPU hosts: all but those that set preflight_require_gpus false."""
    default = install.vars.get("preflight_require_gpus", True)
    return [
        GpuHost(h.name, h.address or h.name)
        for h in install.hosts
        if h.vars.get("preflight_require_gpus", default) is not False
    ]


def settings_from(
    config: ApplianceConfig, credentials_file: Path | None, gpu_hosts: list[GpuHost]
) -> ScrapeSettings:
    # Where this host reaches its own gateway (loopback when it binds every address).
    from appliance.control.supervisor import gateway_url

    url = gateway_url(config)
    return ScrapeSettings(
        gateway=url.split("://", 1)[1],
        gateway_scheme=config.gateway.scheme,
        credentials_file=credentials_file,
        # The gateway's certificate is issued by the internal CA, which sits beside it.
        ca_file=(config.gateway.tls_cert.parent / "ca.pem") if config.gateway.tls_cert else None,
        engines_file=engine_targets_path(config),
        gpu_hosts=gpu_hosts,
    )


def render_config(settings: ScrapeSettings) -> dict[str, Any]:
    gateway: dict[str, Any] = {
        "job_name": GATEWAY_JOB,
        "scheme": settings.gateway_scheme,
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [settings.gateway]}],
    }
    if settings.credentials_file is not None:
        gateway["authorization"] = {
            "type": "Bearer",
            "credentials_file": str(settings.credentials_file),
        }
    if settings.gateway_scheme == "https" and settings.ca_file is not None:
        gateway["tls_config"] = {"ca_file": str(settings.ca_file)}
    scrape: list[dict[str, Any]] = [
        gateway,
        {
            "job_name": ENGINES_JOB,
            # Engines speak plain HTTP on the cluster network; their metrics need no key.
            "scheme": "http",
            "file_sd_configs": [{"files": [str(settings.engines_file)], "refresh_interval": "30s"}],
        },
    ]
    if settings.gpu_hosts:
        scrape.append(
            {
                "job_name": DCGM_JOB,
                "static_configs": [
                    {"targets": [f"{_host(h.address)}:{DCGM_PORT}"], "labels": {"node": h.name}}
                    for h in settings.gpu_hosts
                ],
            }
        )
    return {
        "global": {
            "scrape_interval": settings.scrape_interval,
            "evaluation_interval": settings.scrape_interval,
        },
        "rule_files": [str(p) for p in settings.rules_files],
        "scrape_configs": scrape,
    }


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def render_rules(targets: AlertTargets = AlertTargets()) -> dict[str, Any]:
    """The alert rules: no healthy replica, TTFT p95 over target, errors, KV cache full."""
    ttft_p95 = (
        "histogram_quantile(0.95, sum by (model, le) "
        "(rate(appliance_time_to_first_token_seconds_bucket[5m])))"
    )
    errors = (
        'sum by (model) (rate(appliance_requests_total{status=~"5.."}[5m])) '
        "/ sum by (model) (rate(appliance_requests_total[5m]))"
    )
    kv = (
        "max by (model, replica) (vllm:kv_cache_usage_perc) "
        "or max by (model, replica) (trtllm_kv_cache_utilization)"
    )
    return {
        "groups": [
            {
                "name": "appliance",
                "rules": [
                    {
                        "alert": "ApplianceModelWithoutHealthyReplica",
                        # A model scaled to zero on purpose (idle, wanting no replica)
                        # is not down: its next request starts one.
                        "expr": "appliance_replicas_healthy == 0 "
                        "unless on (model) appliance_replicas_wanted == 0",
                        "for": targets.no_replica_for,
                        "labels": {"severity": "critical"},
                        "annotations": {
                            "summary": "{{ $labels.model }} has no healthy replica",
                            "description": "Requests for {{ $labels.model }} get 503 "
                            "model_unavailable (or go to the cloud where allowed). See "
                            "`appliance status` and the engine log named there.",
                        },
                    },
                    {
                        "alert": "ApplianceTimeToFirstTokenHigh",
                        "expr": f"{ttft_p95} > {targets.ttft_p95_s:g}",
                        "for": targets.slow_for,
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "{{ $labels.model }}: TTFT p95 is "
                            "{{ $value | humanizeDuration }}",
                            "description": "95% of first tokens take longer than "
                            f"{targets.ttft_p95_s:g}s. Look at queueing and KV cache on the "
                            "Engines dashboard; add replicas or lower concurrency.",
                        },
                    },
                    {
                        "alert": "ApplianceErrorRateHigh",
                        "expr": f"({errors}) > {targets.error_ratio:g}",
                        "for": "5m",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "{{ $labels.model }}: {{ $value | humanizePercentage }} "
                            "of requests fail with 5xx",
                            "description": "More than "
                            f"{targets.error_ratio:.0%} of requests end in a server error. "
                            "gateway.log names the engine's answers.",
                        },
                    },
                    {
                        "alert": "ApplianceKVCacheSaturated",
                        "expr": f"({kv}) > {targets.kv_cache_usage:g}",
                        "for": targets.slow_for,
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "{{ $labels.model }} replica {{ $labels.replica }}: "
                            "KV cache {{ $value | humanizePercentage }} full",
                            "description": "The engine preempts or queues requests once its "
                            "KV cache is full. Add replicas, shorten max_model_len or use "
                            "an fp8 KV cache.",
                        },
                    },
                ],
            }
        ]
    }


def dump(data: dict[str, Any]) -> str:
    return "# Generated by appliance.observability.prometheus; do not edit.\n" + yaml.safe_dump(
        data, sort_keys=False, width=1000
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.observability.prometheus",
        description="Print prometheus.yml (or, with --rules, the alert rules) for this appliance.",
    )
    parser.add_argument("--config", type=Path, default=None, help="appliance.toml")
    parser.add_argument("--rules", action="store_true", help="print the alert rules instead")
    parser.add_argument("--credentials-file", type=Path, default=None)
    parser.add_argument("--rules-file", type=Path, action="append", default=[])
    parser.add_argument(
        "--gpu-host", action="append", default=[], metavar="NAME=ADDRESS",
        help="a host running the DCGM exporter (repeat for each)",
    )  # fmt: skip
    parser.add_argument(
        "--engines-file", type=Path, default=None,
        help="the engines' file_sd file as Prometheus reads it (default: in the home's run/)",
    )  # fmt: skip
    parser.add_argument(
        "--ca-file", type=Path, default=None,
        help="the CA Prometheus verifies the gateway with (default: ca.pem beside tls_cert)",
    )  # fmt: skip
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument("--ttft-p95-s", type=float, default=AlertTargets.ttft_p95_s)
    parser.add_argument("--error-ratio", type=float, default=AlertTargets.error_ratio)
    parser.add_argument("--kv-cache-usage", type=float, default=AlertTargets.kv_cache_usage)
    args = parser.parse_args(argv)
    try:
        if args.rules:
            targets = AlertTargets(args.ttft_p95_s, args.error_ratio, args.kv_cache_usage)
            sys.stdout.write(dump(render_rules(targets)))
            return 0
        hosts = []
        for item in args.gpu_host:
            name, sep, address = item.partition("=")
            if not sep or not name or not address:
                raise ConfigError(
                    f"--gpu-host {item!r} is not NAME=ADDRESS",
                    hint="Give each GPU host as --gpu-host gpu01=10.0.0.11.",
                )
            hosts.append(GpuHost(name, address))
        settings = settings_from(load_config(args.config), args.credentials_file, hosts)
        settings.rules_files = args.rules_file
        settings.scrape_interval = args.scrape_interval
        if args.engines_file is not None:
            settings.engines_file = args.engines_file
        if args.ca_file is not None:
            settings.ca_file = args.ca_file
        sys.stdout.write(dump(render_config(settings)))
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
