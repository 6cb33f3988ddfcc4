"""The engines' scrape targets: the file_sd file the supervisor writes from its replica table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.config import parse_config
from appliance.control.records import ReplicaState
from appliance.observability.targets import (
    engine_targets,
    engine_targets_path,
    write_engine_targets,
)
from tests.conftest import replica_state


def _replica(rid: str, url: str, **over: Any) -> ReplicaState:
    return replica_state(rid, **{"model": "llama", "url": url, "node": "10.0.0.12", **over})


def test_each_healthy_fresh_replica_is_a_target_with_our_labels() -> None:
    groups = engine_targets(
        [
            _replica("b", "http://10.0.0.12:40001"),
            _replica("a", "http://10.0.0.11:40002", node="10.0.0.11"),
            _replica("sick", "http://10.0.0.12:40003", healthy=False),
            _replica("stale", "http://10.0.0.12:40004", fresh=False),
            _replica("t", "http://10.0.0.13:40005", engine="trtllm", model="qwen"),
        ]
    )
    assert [(g.targets, g.labels) for g in groups] == [
        (
            ["10.0.0.11:40002"],
            {"model": "llama", "replica": "a", "node": "10.0.0.11", "engine": "vllm",
             "__metrics_path__": "/metrics"},
        ),
        (
            ["10.0.0.12:40001"],
            {"model": "llama", "replica": "b", "node": "10.0.0.12", "engine": "vllm",
             "__metrics_path__": "/metrics"},
        ),
        # TensorRT-LLM serves its Prometheus page on another path.
        (
            ["10.0.0.13:40005"],
            {"model": "qwen", "replica": "t", "node": "10.0.0.12", "engine": "trtllm",
             "__metrics_path__": "/prometheus/metrics"},
        ),
    ]  # fmt: skip


def test_ipv6_engines_and_unknown_engines() -> None:
    groups = engine_targets(
        [_replica("v6", "http://[fd00::5]:40001"), _replica("x", "http://h:1", engine="nope")]
    )
    assert [g.targets for g in groups] == [["[fd00::5]:40001"]]


def test_the_file_is_replaced_only_when_the_table_changes(tmp_path: Path) -> None:
    config = parse_config({"home": str(tmp_path)}, tmp_path / "appliance.toml")
    path = engine_targets_path(config)
    assert path == tmp_path / "run" / "prometheus" / "engines.json"
    groups = engine_targets([_replica("a", "http://127.0.0.1:40001")])
    assert write_engine_targets(path, groups)
    first = path.stat()
    assert not write_engine_targets(path, groups)
    assert path.stat().st_ino == first.st_ino  # untouched: Prometheus is not woken
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:40001"]
    assert path.stat().st_mode & 0o777 == 0o644
    assert write_engine_targets(path, [])
    assert path.stat().st_ino != first.st_ino  # renamed into place, never half written
    assert json.loads(path.read_text()) == []
    assert [p.name for p in path.parent.iterdir()] == ["engines.json"]


def test_the_file_is_written_through_a_symlinked_directory(tmp_path: Path) -> None:
    """Installed heads link <home>/run/prometheus to a directory Prometheus may read."""
    shared = tmp_path / "var-lib-prometheus-appliance"
    shared.mkdir()
    (tmp_path / "home" / "run").mkdir(parents=True)
    (tmp_path / "home" / "run" / "prometheus").symlink_to(shared)
    config = parse_config({"home": str(tmp_path / "home")}, tmp_path / "appliance.toml")
    assert write_engine_targets(engine_targets_path(config), [])
    assert (shared / "engines.json").read_text() == "[]\n"
    assert (tmp_path / "home" / "run" / "prometheus").is_symlink()
