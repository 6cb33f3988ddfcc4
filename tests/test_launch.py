"""One engine launch builder: `plan --print-command` shows what a replica would run."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.catalog import load_catalog
from appliance.cli.plan import engine_command_line
from appliance.config import ApplianceConfig, parse_config
from appliance.control.launch import engine_start, replica_spec
from appliance.control.records import ReplicaSpec
from appliance.control.supervisor import Supervisor
from appliance.placement import Cluster
from appliance.planner import plan_model
from appliance.state import State

MODEL = "llama-3.1-8b-instruct"


def _config(tmp_path: Path, runner: str) -> ApplianceConfig:
    data = {
        "home": str(tmp_path / "home"),
        "engines": {"runner": runner, "vllm": {"image": "appliance/engine-vllm:test"}},
        "models": {MODEL: {"engine_args": ["--seed", "7"], "engine_env": {"VLLM_LOGGING": "1"}}},
    }
    return parse_config(data, tmp_path / "appliance.toml")


@pytest.mark.parametrize("runner", ["process", "container"])
def test_the_printed_command_is_the_one_the_replica_builds(tmp_path: Path, runner: str) -> None:
    config = _config(tmp_path, runner)
    entry = load_catalog(config.catalog).get(MODEL)
    plan = plan_model(entry, Cluster.parse("8xH100-80GB"), engine="vllm")
    State(config.state_db).add_deployment(MODEL, plan)
    supervisor = Supervisor(config)
    supervisor.ray_address = "RAY_HEAD:6379"
    [dep] = supervisor.state.deployments()

    # What the supervisor hands the replica, through Serve (as JSON), as the replica reads it.
    sent = supervisor._spec(dep)
    spec = ReplicaSpec.model_validate(sent.model_dump(mode="json"))
    assert spec == sent == replica_spec(config, entry, plan, "RAY_HEAD:6379")
    gpus = [str(i) for i in range(plan.tensor_parallel)]
    work_dir = Path(spec.work_dir) / MODEL
    replica = engine_start(
        spec,
        host="0.0.0.0",
        port=8001,
        gpu_ids=gpus,
        work_dir=work_dir,
        container=f"{MODEL}-debug",
        base_env={},
        with_api_key=False,
    )

    printed = engine_command_line(config, entry, plan)

    assert printed["argv"] == replica.command.argv
    assert printed["env"].items() <= replica.command.env.items()
    assert printed["files"] == {str(work_dir / n): c for n, c in replica.launch.files.items()}
    # The model's [models.NAME] overrides reach both.
    argv = " ".join(printed["argv"])
    assert "--seed 7" in argv
    assert "VLLM_LOGGING" in printed["env"] or "VLLM_LOGGING=1" in argv
    assert f"--tensor-parallel-size {plan.tensor_parallel}" in argv


def test_a_replica_gets_an_engine_key_and_a_printed_command_none(tmp_path: Path) -> None:
    config = _config(tmp_path, "process")
    entry = load_catalog(config.catalog).get(MODEL)
    plan = plan_model(entry, Cluster.parse("8xH100-80GB"), engine="vllm")
    spec = replica_spec(config, entry, plan, None)
    keyed, printed = (
        engine_start(
            spec,
            host="127.0.0.1",
            port=8001,
            gpu_ids=["0"],
            work_dir=tmp_path,
            container="c",
            base_env={},
            with_api_key=with_key,
        )
        for with_key in (True, False)
    )
    assert keyed.launch.api_key and keyed.command.env["VLLM_API_KEY"] == keyed.launch.api_key
    assert printed.launch.api_key is None and "VLLM_API_KEY" not in printed.command.env
    assert keyed.command.argv == printed.command.argv  # the key is never on the command line


def test_a_replica_gets_the_entry_its_plan_was_made_from(tmp_path: Path) -> None:
    config = _config(tmp_path, "process")
    catalog = load_catalog(config.catalog).get(MODEL)
    plan = plan_model(catalog, Cluster.parse("8xH100-80GB"), engine="vllm")
    # The catalog changed since `model add` (a newer models.toml): the record's entry holds.
    added = catalog.model_copy(update={"tool_parser": "hermes"})
    State(config.state_db).add_deployment(MODEL, plan, added)
    supervisor = Supervisor(config)
    [dep] = supervisor.state.deployments()
    assert dep.entry == added
    spec = supervisor._spec(dep)
    assert spec is not None and spec.entry == added
    # A record from before entries were kept: the catalog's.
    State(config.state_db).add_deployment(MODEL, plan)
    [old] = supervisor.state.deployments()
    assert old.entry is None
    spec = supervisor._spec(old)
    assert spec is not None and spec.entry == catalog
