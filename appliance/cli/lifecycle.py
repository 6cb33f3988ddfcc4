"""`appliance up`, `down`, `status` and `config`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer

from appliance.audit import admin_event
from appliance.catalog import load_catalog
from appliance.cli.common import config_of, console, print_json
from appliance.config import ApplianceConfig, EngineConfig
from appliance.control.records import ScaleState, StatusFile
from appliance.control.runtime import (
    clear_status,
    last_supervisor_pid,
    log_tail,
    pid_alive,
    read_status,
    session_pids,
    stop_pids,
    supervisor_env,
)
from appliance.deploy import DEFAULT_MODEL, add_model
from appliance.engines import ADAPTERS, EngineLoad
from appliance.engines.cpuenv import CpuEngineEnv
from appliance.errors import ClusterError
from appliance.logs import ensure_log_dir
from appliance.state import State


def key_file(config: ApplianceConfig) -> Path:
    return config.home_dir / "api-key"


def _ensure_api_key(config: ApplianceConfig) -> None:
    """First start: create a key and keep it in a file only its owner can read."""
    state = State(config.state_db)
    if not config.gateway.require_api_key or state.active_key_digests():
        return
    key = state.create_key(
        "default", audit=admin_event("key created", "default", {"by": "appliance up"})
    )
    path = key_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    console.print(f"Created API key 'default'; it is in {path} (readable by you only).")


def _failed(status: StatusFile | None) -> dict[str, str]:
    """Models that failed to deploy or cannot be deployed (the supervisor keeps trying)."""
    models = status.models if status is not None else {}
    return {name: m.message or "no message" for name, m in models.items() if m.failed}


def _endpoint(status: StatusFile) -> str:
    """The endpoint as bound; a wildcard bind is said to be one, with a name to use."""
    endpoint = status.endpoint
    for wildcard in ("://0.0.0.0:", "://[::]:"):
        if wildcard in endpoint:
            named = endpoint.replace(wildcard, f"://{socket.getfqdn()}:")
            return f"{endpoint} (every address of this host, e.g. {named})"
    return endpoint


def _progress_line(status: StatusFile | None) -> str:
    if status is None:
        return "starting supervisor"
    parts = [status.phase]
    if status.phase == "running" and not status.gateway.ready:
        parts.append("gateway starting")
    for name, model in status.models.items():
        n = model.healthy_replicas
        if model.scaling is not None and model.scaling.scaled_to_zero and not n:
            parts.append(f"{name}: scaled to zero")
            continue
        parts.append(f"{name}: {n} healthy" if n else f"{name}: {model.status.lower()}")
    return ", ".join(parts)


def _audit_start(config: ApplianceConfig, state: State) -> None:
    """The start, with the configuration it runs: a changed one is recorded as such."""
    effective = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(effective.encode()).hexdigest()
    detail = {"config": str(config.source or "embedded default"), "config_sha256": digest}
    last = state.last_audit("appliance started")
    events = [admin_event("appliance started", None, detail)]
    if last is not None and last.get("config_sha256") != digest:
        events.insert(0, admin_event("configuration changed", detail["config"], detail))
    state.append_audit(events)


def _replan_retired_engines(config: ApplianceConfig) -> None:
    """Deployments planned for an engine this version no longer has (the `cpu` engine,
    `transformers serve`, of earlier versions) are planned again, and their builtin
    weights rebuilt if their shape changed."""
    for dep in State(config.state_db).deployments():
        engine = dep.engine
        if engine not in ADAPTERS:
            with console.status(f"Planning {dep.model} again (its engine {engine} is gone)..."):
                result = add_model(config, dep.model)
            console.print(
                f"Planned {dep.model} again: engine {result.plan.engine} (it was planned for "
                f"the {engine} engine, which this version replaced)."
            )


def ensure_cpu_engine(config: ApplianceConfig) -> None:
    """Install vLLM's CPU build when a deployment needs it and none is configured; a no-op
    when it is installed already (the common case: one check of a file)."""
    if config.engines.vllm.command:
        return
    plans = [d.plan for d in State(config.state_db).deployments()]
    if not any(p.engine == "vllm" and p.on_cpu for p in plans):
        return
    env = CpuEngineEnv.of(config.engines)
    if env.ready:
        return
    console.print(
        f"Installing vLLM's CPU engine ({env.root.name}) into {env.root}, once for this user "
        "(a few minutes; the log is in "
        f"{env.log})."
    )
    started = time.monotonic()
    with console.status("Installing vLLM's CPU engine...") as spinner:
        env.ensure(lambda line: spinner.update(f"Installing vLLM's CPU engine: {line}"))
    console.print(f"Installed vLLM's CPU engine in {time.monotonic() - started:.0f}s.")


def _stop_leftovers(config: ApplianceConfig) -> None:
    """Stop what a supervisor that died (killed, OOM) left in its session: Ray, engines, a
    gateway still holding the port."""
    dead = last_supervisor_pid(config)
    # If that pid lives again it belongs to someone else, and so may its session.
    leftovers = session_pids(dead) if dead and not pid_alive(dead) else []
    if leftovers:
        with console.status(f"Stopping {len(leftovers)} process(es) left by a dead supervisor"):
            stop_pids(leftovers)
        console.print(f"Stopped {len(leftovers)} process(es) left by a supervisor that died.")
    clear_status(config)


def up(
    ctx: typer.Context,
    foreground: bool = typer.Option(
        False, "--foreground", help="Run in this process (for systemd) instead of detaching."
    ),
    timeout: float = typer.Option(
        900.0, help="Seconds to wait for every model to have a healthy replica."
    ),
) -> None:
    """Start the appliance: Ray, one Serve deployment per model, and the gateway.

    On the embedded default (no appliance.toml) with no models added yet, the default model
    (smollm2-135m-instruct, a real 135M-parameter chat model that answers on the CPU) is
    added first. Returns once the endpoint answers and every model has a healthy replica.
    """
    config = config_of(ctx)
    running = read_status(config)
    if running is not None:
        console.print(f"The appliance is already running (pid {running.pid}).")
        console.print(f"Endpoint: {_endpoint(running)}")
        return
    state = State(config.state_db)
    if config.is_embedded_default and not state.deployments():
        # The first `up` on a fresh machine fetches the default model: say what and how big
        # (the download draws its own progress bar).
        console.print(f"Adding {DEFAULT_MODEL}, the embedded default's model...")
        add_model(config, DEFAULT_MODEL, lambda step: console.print(f"  {step}", soft_wrap=True))
    _replan_retired_engines(config)
    ensure_cpu_engine(config)
    _ensure_api_key(config)
    catalog = load_catalog(config.catalog)
    for name in config.models:
        if name not in catalog:
            console.print(
                f"[yellow]warning:[/] {config.source}: [models.{name}] names no catalog model; "
                "its overrides apply to nothing (`appliance model list --all` lists the names)."
            )
    argv = [sys.executable, "-m", "appliance.control.supervisor"]
    if config.source is not None:
        argv += ["--config", str(config.source.resolve())]
    env = {**os.environ, **supervisor_env(config)}
    _stop_leftovers(config)
    _audit_start(config, state)
    if foreground:
        # systemd and containers supervise this process directly (and keep its output).
        os.execve(sys.executable, argv, env)

    ensure_log_dir(config.log_dir)
    log_path = config.log_dir / "supervisor.log"
    started = time.monotonic()
    # The supervisor takes over this file with rotation; what it prints before it can
    # (an import error) still lands here.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            [*argv, "--log-file", str(log_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    status: StatusFile | None = None
    with console.status("Starting the appliance...") as spinner:
        while True:
            if proc.poll() is not None:
                raise ClusterError(
                    f"the supervisor exited with code {proc.returncode} while starting",
                    hint=f"Its log {log_path} ends with:\n{log_tail(log_path)}",
                )
            status = read_status(config)
            if status is not None and status.ready:
                break
            if failed := _failed(status):
                details = "\n".join(f"  {name}: {msg}" for name, msg in failed.items())
                raise ClusterError(
                    f"the appliance started, but these models could not be deployed:\n{details}",
                    hint=f"Logs are in {config.log_dir}. The appliance keeps running and retries "
                    "them; `appliance status` shows progress, `appliance down` stops it.",
                )
            if time.monotonic() - started > timeout:
                raise ClusterError(
                    f"the appliance is still starting after {timeout:.0f}s "
                    f"({_progress_line(status)})",
                    hint="It keeps trying in the background: watch `appliance status`, read "
                    f"{config.log_dir}, or stop it with `appliance down`.",
                )
            spinner.update(f"Starting the appliance: {_progress_line(status)}")
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    assert status is not None
    console.print(f"[green]The appliance is up[/] ({elapsed:.1f}s).")
    console.print(f"Endpoint: {_endpoint(status)}")
    console.print(f"Models:   {', '.join(status.models) or 'none'}")
    for name, model in status.models.items():
        if model.message:
            console.print(f"[yellow]warning:[/] {name}: {model.message}")
    if config.gateway.require_api_key and key_file(config).exists():
        console.print(f"API key:  export OPENAI_API_KEY=$(cat {key_file(config)})")


def down(ctx: typer.Context) -> None:
    """Stop the appliance and every process it started."""
    config = config_of(ctx)
    status = read_status(config)
    if status is None:
        _stop_leftovers(config)
        console.print("The appliance is not running.")
        return
    pid = status.pid
    with console.status("Stopping models, the gateway and Ray..."):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        # Whatever is left in the supervisor's session (it ran with its own session id).
        leftovers = [p for p in session_pids(pid) if p != os.getpid()]
        forced = stop_pids(leftovers) if leftovers else []
    clear_status(config)
    console.print("The appliance is stopped.")
    if leftovers:
        console.print(
            f"Stopped {len(leftovers)} process(es) that outlived the supervisor"
            + (f" ({len(forced)} by SIGKILL)." if forced else ".")
        )


def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the endpoint, each model's replicas and their health."""
    config = config_of(ctx)
    current = read_status(config)
    if as_json:
        print_json(current.public() if current is not None else {"phase": "stopped"})
        if current is None:
            raise typer.Exit(1)
        return
    if current is None:
        console.print("The appliance is not running. Start it with `appliance up`.")
        raise typer.Exit(1)
    uptime = time.time() - (current.started_at or time.time())
    gateway = current.gateway
    console.print(f"Endpoint  {_endpoint(current)}")
    console.print(f"State     {current.phase} for {uptime:.0f}s (supervisor pid {current.pid})")
    console.print(
        f"Gateway   {'ready' if gateway.ready else '[red]not ready[/]'} "
        f"(pid {gateway.pid}, {gateway.restarts} restarts)"
    )
    if current.stale:
        console.print("[yellow]The supervisor has not updated its status for a while.[/]")
    if not current.models:
        console.print("\nNo models deployed. `appliance model add NAME` adds one.")
    for name, model in current.models.items():
        console.print(
            f"\n[bold]{name}[/]  engine {model.engine}  {model.status}  "
            f"{model.healthy_replicas}/{len(model.replicas)} healthy"
        )
        if model.message:
            console.print(f"  [yellow]{model.message}[/]")
        for line in _scaling_lines(model.scaling):
            console.print(f"  {line}")
        for rep in model.replicas:
            age = time.time() - (rep.started_at or time.time())
            console.print(
                f"  replica {rep.replica_id}  "
                f"{'healthy' if rep.routable else '[red]unhealthy[/]'}  {rep.url}  "
                f"engine pid {rep.pid}  up {age:.0f}s{_load_text(rep.load)}"
            )
            for rank in rep.ranks:
                console.print(
                    f"    rank {rank.rank} (stage {rank.stage}) on {rank.node}: "
                    f"bundle {rank.bundle} (node id {rank.node_id[:12]})"
                )
            if not rep.routable:
                why = rep.problem or "no report for a while (replica stopped or stuck?)"
                console.print(f"    [yellow]{why}[/]")


def _scaling_lines(scaling: ScaleState | None) -> list[str]:
    """An autoscaled model's bounds, demand and decisions (a fixed count says nothing)."""
    if scaling is None or not scaling.autoscaled:
        return []
    idle = "" if scaling.idle_s is None else f", last request {scaling.idle_s:.0f}s ago"
    lines = [
        f"autoscaled: {scaling.target} replica(s) set (min {scaling.min_replicas}, max "
        f"{scaling.max_replicas}, target_queue {scaling.target_queue:g}, priority "
        f"{scaling.priority}); queue {scaling.queue:g}, wanted {scaling.wanted}{idle}"
    ]
    if scaling.message and scaling.scaled_to_zero:
        lines.append(scaling.message)
    if scaling.decisions:
        done = ", ".join(f"{action} {n}" for action, n in sorted(scaling.decisions.items()))
        lines.append(f"scaling decisions since start: {done}")
    return lines


def _load_text(load: EngineLoad | None) -> str:
    """The engine's own figures, as its replica last read them from its metrics."""
    if load is None:
        return ""
    text = f"  running {load.running:g}, waiting {load.waiting:g}"
    if load.kv_cache_usage is not None:
        text += f", KV cache {load.kv_cache_usage * 100:.0f}% used"
    return text


def show_config(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print the effective configuration and where it came from."""
    config = config_of(ctx)
    data = config.model_dump(mode="json")
    # What the engines are run with: the defaults EnginesConfig.of fills in, not null.
    for engine, field in type(config.engines).model_fields.items():
        if field.annotation is EngineConfig:
            data["engines"][engine] = config.engines.of(engine).model_dump(mode="json")
    data["resolved"] = {
        "source": str(config.source) if config.source else "embedded default",
        "home": str(config.home_dir),
        "store": str(config.store_dir),
        "state_db": str(config.state_db),
        # Where CPU plans' engine is (or will be) installed: engines.env_dir resolved.
        "cpu_engine": str(CpuEngineEnv.of(config.engines).root),
    }
    if as_json:
        print_json(data)
        return
    console.print(f"# source: {data['resolved']['source']}")
    print_json(data)
