"""Warm start: the supervisor's engine, offered to the first replica (control/warm.py).

The engine here is a stand-in program (engines.vllm.command), so that the real launch
builder, process groups and the handover files are exercised without vLLM; the
end-to-end tests (tests/test_e2e.py) check a real vLLM engine started warm and adopted.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.catalog import load_catalog
from appliance.config import ApplianceConfig, parse_config
from appliance.control.launch import engine_start, replica_spec
from appliance.control.records import Deployment, ReplicaSpec
from appliance.control.runtime import pid_alive
from appliance.control.warm import (
    EXITED_UNKNOWN,
    AdoptedProcess,
    WarmEngines,
    WarmOffer,
    claim,
    eligible,
    exit_text,
    read_offer,
)
from appliance.engines.runner import EngineCommand
from appliance.planner import Plan, plan_model

MODEL = "tiny-random-llama"


def _config(tmp_path: Path, **serve: object) -> ApplianceConfig:
    engine = tmp_path / "engine"
    # Ignores its arguments, as a stand-in; its child shares its group, as vLLM's does.
    engine.write_text("#!/bin/sh\nsleep 300 &\nexec sleep 300\n")
    engine.chmod(engine.stat().st_mode | stat.S_IXUSR)
    data = {
        "home": str(tmp_path / "home"),
        "engines": {"vllm": {"command": str(engine)}},
        "serve": serve,
    }
    return parse_config(data, tmp_path / "appliance.toml")


def _spec(config: ApplianceConfig) -> ReplicaSpec:
    entry = load_catalog(config.catalog).get(MODEL)
    return replica_spec(config, entry, plan_model(entry, 0), None)


def _as_replica(spec: ReplicaSpec, offer: WarmOffer) -> tuple[list[str], dict[str, str]]:
    """What the replica builds to compare with the offer (control/replica.py)."""
    start = engine_start(
        spec,
        host=offer.host,
        port=offer.port,
        gpu_ids=(),
        work_dir=Path(offer.work_dir),
        container="ignored-for-processes",
        base_env={"RAY_ONLY_IN_THE_WORKER": "1"},
        with_api_key=True,
        api_key=offer.api_key,
    )
    return start.command.argv, dict(start.launch.env)


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[tuple[WarmEngines, ReplicaSpec]]:
    config = _config(tmp_path)
    engines = WarmEngines(config)
    yield engines, _spec(config)
    engines.stop_all()


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _live_members(pgid: int) -> list[int]:
    """The group's processes that still run (a zombie left to PID 1 does not)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_the_first_replica_adopts_the_engine_started_warm(
    warm: tuple[WarmEngines, ReplicaSpec],
) -> None:
    engines, spec = warm
    offer = engines.start(spec)
    assert offer is not None and pid_alive(offer.pid)
    offered = engines.dir / f"{MODEL}.json"
    # The offer holds the engine's key: only this user reads it.
    assert stat.S_IMODE(offered.stat().st_mode) == 0o600
    assert read_offer(engines.dir, MODEL) == offer
    assert offer.api_key and offer.api_key not in " ".join(offer.argv)

    argv, env = _as_replica(spec, offer)
    assert claim(engines.dir, offer, _command(argv), env)
    assert not offered.exists() and read_offer(engines.dir, MODEL) is None
    # Taken once: a second replica finds nothing and starts its own.
    assert not claim(engines.dir, offer, _command(argv), env)

    # This process claimed it and lives: the supervisor leaves the engine running.
    engines.tick()
    assert pid_alive(offer.pid) and MODEL in engines.engines

    adopted = AdoptedProcess(offer.pid)
    assert adopted.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        adopted.wait(timeout=0.1)
    os.killpg(offer.pid, 15)
    assert adopted.wait(timeout=10) == EXITED_UNKNOWN
    assert exit_text(adopted.returncode) == "exited" and exit_text(1) == "exited with code 1"

    # The supervisor reaps it and clears the handover files.
    def reaped() -> bool:
        engines.tick()
        return MODEL not in engines.engines

    assert _wait(reaped)
    assert list(engines.dir.iterdir()) == []


def _command(argv: list[str]) -> EngineCommand:
    return EngineCommand(argv, {})


def test_a_replica_that_would_run_another_command_starts_its_own(
    warm: tuple[WarmEngines, ReplicaSpec],
) -> None:
    engines, spec = warm
    offer = engines.start(spec)
    assert offer is not None
    argv, env = _as_replica(spec, offer)
    assert not claim(engines.dir, offer, _command([*argv, "--seed", "1"]), env)
    assert not claim(engines.dir, offer, _command(argv), {**env, "OMP_NUM_THREADS": "2"})
    # Still on offer, for the replica it was started for.
    assert read_offer(engines.dir, MODEL) == offer


def test_a_warm_engine_nobody_claims_is_stopped(tmp_path: Path) -> None:
    config = _config(tmp_path)
    engines = WarmEngines(config, claim_timeout_s=0.0)
    try:
        offer = engines.start(_spec(config))
        assert offer is not None
        group = offer.pid
        engines.tick()
        assert not pid_alive(offer.pid) and MODEL not in engines.engines
        # The whole group, the engine's own child included.
        assert _wait(lambda: _live_members(group) == [])
        assert list(engines.dir.iterdir()) == []
    finally:
        engines.stop_all()


def test_a_warm_engine_whose_replica_died_is_stopped(
    warm: tuple[WarmEngines, ReplicaSpec],
) -> None:
    engines, spec = warm
    offer = engines.start(spec)
    assert offer is not None
    argv, env = _as_replica(spec, offer)
    # A replica process that claims the engine and then dies without stopping it.
    code = (
        "import sys; from pathlib import Path; from appliance.control.warm import claim, "
        "WarmOffer; from appliance.engines.runner import EngineCommand; "
        "o = WarmOffer.model_validate_json(sys.argv[1]); "
        "sys.exit(0 if claim(Path(sys.argv[2]), o, EngineCommand(sys.argv[4:], {}), "
        "__import__('json').loads(sys.argv[3])) else 3)"
    )
    args = [offer.model_dump_json(), str(engines.dir), json.dumps(env), *argv]
    replica = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
    )
    assert replica.returncode == 0
    engines.tick()
    assert not pid_alive(offer.pid) and MODEL not in engines.engines


def test_warm_start_only_where_the_replica_runs_here_on_the_cpu(tmp_path: Path) -> None:
    cpu = Deployment(model=MODEL, plan=Plan(engine="vllm", precision="bf16"))
    gpu = Deployment(
        model=MODEL, plan=Plan(engine="vllm", precision="bf16", gpus_per_replica=1, gpu="H100")
    )
    assert cpu.plan.on_cpu and not gpu.plan.on_cpu
    assert eligible(_config(tmp_path), cpu)
    assert not eligible(_config(tmp_path), gpu)
    assert not eligible(_config(tmp_path, warm_start=False), cpu)
    remote = parse_config(
        {"home": str(tmp_path / "h2"), "ray": {"address": "10.0.0.1:6379"}},
        tmp_path / "appliance.toml",
    )
    assert not eligible(remote, cpu)
    entry = load_catalog(remote.catalog).get(MODEL)
    assert replica_spec(remote, entry, cpu.plan, None).warm_dir is None
