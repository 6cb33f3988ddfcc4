"""Real engines started outside Ray, exactly as a replica starts them (adapter argv, runner
command, the plan for this machine), for tests and benchmarks that need the engine without
the appliance around it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start_engine(
    model: str, weights: Path, port: int, log: Path, work_dir: Path
) -> subprocess.Popen[bytes]:
    """The catalog model's engine on this machine's plan (vLLM's CPU build here), serving
    `weights` on 127.0.0.1:`port`, in a session of its own so it can be stopped whole."""
    from appliance.catalog import load_catalog
    from appliance.config import EnginesConfig
    from appliance.engines import LaunchSpec, get_adapter
    from appliance.engines.runner import engine_command
    from appliance.placement import Cluster
    from appliance.planner import plan_model

    entry = load_catalog().get(model)
    plan = plan_model(entry, Cluster.cpu_only())
    engines = EnginesConfig()
    spec = LaunchSpec(
        model=model,
        weights=weights,
        host="127.0.0.1",
        port=port,
        entry=entry,
        plan=plan,
        work_dir=work_dir,
    )
    launch = get_adapter(plan.engine, engines.of(plan.engine)).launch(spec)
    cmd = engine_command(spec, launch, plan.engine, engines, "direct", dict(os.environ))
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd.argv, env=cmd.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_engine(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """The engine's whole process group (its own session): the engine core and the worker
    go with the API server, which exits first; SIGKILL for what is left after `timeout_s`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        proc.poll()  # reap the leader, so that only live members keep the group
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()
