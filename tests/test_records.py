"""The records that cross processes: what a reader makes of a newer writer, "routable",
the names a replica answers with, and where the engines' keys may not go."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance.catalog import load_catalog
from appliance.config import load_config
from appliance.control.records import (
    Deployment,
    ModelStatus,
    RegistrySnapshot,
    ReplicaInfo,
    ReplicaSpec,
    StatusFile,
)
from appliance.control.runtime import read_status, status_path, write_status
from appliance.gateway.replicas import replicas_from_snapshot
from appliance.planner import Plan
from appliance.state import State
from tests.conftest import replica_state

PLAN = Plan(engine="vllm", precision="bf16")


def _with_unknown_fields(data: Any, names: bool = False) -> Any:
    """The same data as a newer writer would send it: a new field in every object
    (`names`: a map from names to objects, such as the status file's models)."""
    if isinstance(data, dict):
        fields = {k: _with_unknown_fields(v, names=k == "models") for k, v in data.items()}
        return fields if names else {**fields, "added_later": [1]}
    if isinstance(data, list):
        return [_with_unknown_fields(v) for v in data]
    return data


def _status() -> StatusFile:
    replica = replica_state(load={"running": 1.0, "waiting": 0.0}, engine_key="sk-engine")
    model = ModelStatus(engine="vllm", plan=PLAN, status="RUNNING", replicas=[replica])
    return StatusFile(pid=os.getpid(), phase="running", models={"tiny": model})


def test_a_newer_writers_status_file_reads_as_what_this_version_knows() -> None:
    status = _status()
    text = json.dumps(_with_unknown_fields(json.loads(status.file_text())))
    assert "added_later" in text
    read = StatusFile.model_validate_json(text)
    # All this version knows, less the engine key, which is never written.
    assert read.file_text() == status.file_text()
    assert read.models["tiny"].healthy_replicas == 1


@pytest.mark.parametrize("record", [ReplicaInfo, RegistrySnapshot])
def test_a_newer_replicas_reports_read_as_what_this_version_knows(record: type[Any]) -> None:
    replica = replica_state()
    data = (
        {"models": ["tiny"], "replicas": [replica.model_dump()]}
        if record is RegistrySnapshot
        else replica.model_dump()
    )
    read = record.model_validate(_with_unknown_fields(data))
    assert read == record.model_validate(data)
    assert "added_later" not in json.dumps(read.model_dump(mode="json"))


def test_a_newer_supervisors_replica_spec_reads_as_what_this_version_knows(
    appliance_home: Path,
) -> None:
    from appliance.catalog import load_catalog
    from appliance.control.launch import replica_spec

    config = load_config()
    entry = load_catalog(config.catalog).get("tiny-random-llama")
    spec = replica_spec(config, entry, PLAN, None)
    data = spec.model_dump(mode="json")
    # Nested config keeps rejecting typos; new fields come at the record's own level.
    newer = {**data, "added_later": 1, "plan": {**data["plan"], "added_later": 1}}
    assert ReplicaSpec.model_validate(newer) == spec


def test_a_plan_a_newer_version_stored_reads_and_is_parsed_once(appliance_home: Path) -> None:
    state = State(appliance_home / "state.db")
    state.add_deployment("m", PLAN)
    with sqlite3.connect(state.path) as conn:
        conn.execute("UPDATE deployments SET plan = ?", (json.dumps({**PLAN.to_dict(), "x": 1}),))
    [first] = state.deployments()
    assert first.plan == PLAN and first.engine == "vllm"
    # Read every second by the supervisor: the same record until the row changes.
    [again] = state.deployments()
    assert again is first
    state.add_deployment("m", Plan(engine="vllm", precision="fp8"))
    [changed] = state.deployments()
    assert changed is not first and changed.plan.precision == "fp8"
    assert Deployment.model_validate({"model": "m", "plan": PLAN.to_dict()}).plan == PLAN


def test_an_entry_this_version_cannot_read_leaves_the_plan(appliance_home: Path) -> None:
    state = State(appliance_home / "state.db")
    entry = load_catalog(None).get("tiny-random-llama")
    state.add_deployment("m", PLAN, entry)
    [dep] = state.deployments()
    assert dep.entry == entry
    # Written by a version whose catalog entries had a field this one does not know.
    newer = json.dumps({**entry.model_dump(mode="json"), "added_later": 1})
    with sqlite3.connect(state.path) as conn:
        conn.execute("UPDATE deployments SET entry = ?", (newer,))
    [dep] = state.deployments()
    assert dep.entry is None and dep.plan == PLAN  # the supervisor uses its catalog's


def test_routable_is_healthy_and_fresh_for_every_reader() -> None:
    replicas = [
        replica_state("ok"),
        replica_state("sick", healthy=False, problem="engine exited with code 1"),
        replica_state("silent", fresh=False),
    ]
    assert [r.routable for r in replicas] == [True, False, False]
    snapshot = RegistrySnapshot(models=["tiny-random-llama"], replicas=replicas)
    # The gateway routes to, and the status file counts, the same replicas.
    assert [r.replica_id for r in replicas_from_snapshot(snapshot)] == ["ok"]
    model = ModelStatus(engine="vllm", plan=PLAN, status="RUNNING", replicas=replicas)
    assert model.healthy_replicas == 1
    status = StatusFile(pid=1, phase="running", gateway={"ready": True}, models={"m": model})
    assert status.ready
    alone = model.model_copy(update={"replicas": replicas[1:]})
    assert not status.model_copy(update={"models": {"m": alone}}).ready


def test_responses_are_named_as_requests_unless_the_engine_says_otherwise() -> None:
    assert replica_state(engine_model="served").response_model == "served"
    assert replica_state(engine_model="served", response_model=None).response_model == "served"
    named = replica_state(engine_model="served", response_model="/models/tiny")
    assert named.response_model == "/models/tiny"
    [replica] = replicas_from_snapshot(RegistrySnapshot(replicas=[named]))
    assert (replica.engine_model, replica.response_model) == ("served", "/models/tiny")


def test_engine_keys_reach_the_gateway_but_never_the_status_file(
    appliance_home: Path, supervisor_pid: int
) -> None:
    status = _status().model_copy(update={"pid": supervisor_pid})
    [replica] = replicas_from_snapshot(RegistrySnapshot(replicas=status.replicas()))
    assert replica.api_key == "sk-engine"
    config = load_config()
    write_status(config, status)
    assert "sk-engine" not in status_path(config).read_text()
    read = read_status(config)
    assert read is not None and read.replicas()[0].engine_key is None
    assert "sk-engine" not in json.dumps(status.public())
    assert "sk-engine" not in json.dumps(status.models["tiny"].public())
