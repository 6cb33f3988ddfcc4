"""How a deployment becomes an engine command: built here only, for the replica that runs
it and for `appliance plan --print-command`, which shows it to run by hand.

`replica_spec` is what the supervisor hands every replica of a model (with the model's
`[models.NAME]` overrides applied); `engine_start` turns one into the engine's argv and
env on the replica's host, port and GPUs.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.catalog import ModelEntry
from appliance.config import ApplianceConfig
from appliance.control.records import ReplicaSpec
from appliance.engines import EngineAdapter, EngineLaunch, LaunchSpec, get_adapter
from appliance.engines.runner import EngineCommand, engine_command
from appliance.planner import Plan
from appliance.store import Store


def replica_spec(
    config: ApplianceConfig, entry: ModelEntry, plan: Plan, ray_address: str | None
) -> ReplicaSpec:
    override = config.models.get(entry.name)
    return ReplicaSpec(
        model=entry.name,
        weights=str(Store(config.store_dir).path(entry.name)),
        entry=entry,
        plan=plan,
        engines=config.engines,
        extra_args=tuple(override.engine_args) if override else (),
        extra_env=dict(override.engine_env) if override else {},
        log_dir=str(config.log_dir),
        work_dir=str(config.run_dir / "engines"),
        engine_host="127.0.0.1" if not config.ray.address else None,
        ray_address=ray_address,
        start_timeout_s=config.serve.engine_start_timeout_s,
        report_interval_s=config.serve.report_interval_s,
        probe_interval_s=config.serve.probe_interval_s,
        probe_timeout_s=config.serve.probe_timeout_s,
        warm_dir=str(config.run_dir / "warm")
        if config.serve.warm_start and not config.ray.address
        else None,
    )


@dataclass(frozen=True)
class EngineStart:
    adapter: EngineAdapter
    spec: LaunchSpec
    launch: EngineLaunch
    command: EngineCommand


def engine_start(
    spec: ReplicaSpec,
    *,
    host: str,
    port: int,
    gpu_ids: Sequence[str],
    work_dir: Path,
    container: str,
    base_env: Mapping[str, str],
    with_api_key: bool,
    api_key: str | None = None,
    placement_group: str | None = None,
    bundle_indices: Sequence[int] = (),
) -> EngineStart:
    """The engine of one replica: its adapter, argv, env and files.

    `with_api_key`: give an engine that can require a key a fresh one (a replica does;
    a command printed for a person does not); `api_key`: the one a warm engine was
    started with, which the replica adopting it must use; `placement_group`: the hex id
    of the group a replica whose stages span nodes runs in, `bundle_indices` the bundle
    of it each rank takes.
    """
    adapter = get_adapter(spec.engine, spec.engines.of(spec.engine))
    if not (with_api_key and adapter.accepts_api_key):
        api_key = None
    elif api_key is None:
        api_key = secrets.token_urlsafe(32)
    launch_spec = LaunchSpec(
        model=spec.model,
        weights=Path(spec.weights),
        host=host,
        port=port,
        entry=spec.entry,
        plan=spec.plan,
        gpu_ids=tuple(gpu_ids),
        work_dir=work_dir,
        extra_args=spec.extra_args,
        extra_env=dict(spec.extra_env),
        ray_address=spec.ray_address,
        placement_group=placement_group,
        bundle_indices=tuple(bundle_indices),
        api_key=api_key,
    )
    launch = adapter.launch(launch_spec)
    command = engine_command(launch_spec, launch, spec.engine, spec.engines, container, base_env)
    return EngineStart(adapter, launch_spec, launch, command)
