"""The engines' scrape targets, for Prometheus's file-based service discovery.

The supervisor already holds the live replica table (it publishes it in the status file),
so it also writes each healthy replica's engine address to `<home>/run/prometheus/
engines.json`, in file_sd format:

    [{"targets": ["10.0.0.12:40123"],
      "labels": {"model": "llama-3.1-8b-instruct", "replica": "a1b2c3", "node": "10.0.0.12",
                 "engine": "vllm", "__metrics_path__": "/metrics"}}]

Prometheus re-reads the file when it changes. Direct targets rather than Ray's metrics
export: the table and its labels are ours already, and no Ray dashboard agent has to run.
The file is replaced atomically (rename), and only when its content changes, so Prometheus
never reads half a file and is not woken every second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from appliance.config import ApplianceConfig
from appliance.control.records import ReplicaState
from appliance.engines import ADAPTERS


class TargetGroup(BaseModel):
    """One entry of a file_sd file: the engine of one replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str]
    labels: dict[str, str]


def engine_targets_path(config: ApplianceConfig) -> Path:
    return config.run_dir / "prometheus" / "engines.json"


def engine_targets(replicas: list[ReplicaState]) -> list[TargetGroup]:
    """A target group per routable replica whose engine has a metrics page."""
    groups = []
    for replica in replicas:
        if not replica.routable:
            continue
        adapter = ADAPTERS.get(replica.engine)
        metrics_path = adapter.metrics_path if adapter is not None else None
        url = urlsplit(replica.url)
        if metrics_path is None or url.hostname is None or url.port is None:
            continue
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        groups.append(
            TargetGroup(
                targets=[f"{host}:{url.port}"],
                labels={
                    "model": replica.model,
                    "replica": replica.replica_id,
                    "node": replica.node or url.hostname,
                    "engine": replica.engine,
                    "__metrics_path__": metrics_path,
                },
            )
        )
    return sorted(groups, key=lambda g: (g.labels["model"], g.labels["replica"]))


def render_targets(groups: list[TargetGroup]) -> str:
    return json.dumps([g.model_dump() for g in groups], indent=2, sort_keys=True) + "\n"


def write_engine_targets(path: Path, groups: list[TargetGroup]) -> bool:
    """Replace the file when its content differs; True when it was written."""
    text = render_targets(groups)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    # Readable by the prometheus user: addresses and labels, nothing secret.
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return True
