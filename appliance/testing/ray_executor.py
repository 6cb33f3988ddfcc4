"""A stand-in for vLLM's Ray executor, for the fake engine given `--distributed-executor-backend
ray`: it finds its placement group and places its workers as vLLM 0.32 does.

What vLLM does, and this repeats (vllm/plugins/__init__.py `load_general_plugins`,
vllm/v1/executor/ray_utils.py `initialize_ray_cluster` and `get_bundles_for_indices` /
`get_bundles_sorted_by_node`, vllm/v1/executor/ray_executor_v2.py, the default Ray
executor): load every `vllm.general_plugins` entry point and call it (VLLM_PLUGINS, when
set, names the ones allowed); join Ray (`ray.init()`, at RAY_ADDRESS); take
`ray.util.get_current_placement_group()`, refusing a bundle of more than one GPU or fewer
GPU bundles than ranks (with no group, vLLM would create one of its own: here that is an
error, since the replica's group already holds the GPUs); give rank r the bundle
VLLM_RAY_BUNDLE_INDICES names r-th, or else the GPU bundles sorted with the engine's node
first, then by node id; start one worker per rank there, `num_cpus=0`, one GPU; fail the
engine when a worker is lost. Each worker reports its rank, bundle, node and what Ray
made visible to it. Only the fake engine uses this; it needs the Ray of the appliance's
environment, which the fake engine runs in.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from importlib.metadata import entry_points
from typing import Any

PLUGINS_GROUP = "vllm.general_plugins"
WATCH_INTERVAL_S = 0.5


class ExecutorError(SystemExit):
    """What vLLM's executor would raise: the engine stops with this message."""


def load_general_plugins() -> list[str]:
    """vLLM's `load_general_plugins`: every entry point of the group, loaded and called."""
    allowed = os.environ.get("VLLM_PLUGINS")
    names = None if allowed is None else allowed.split(",")
    loaded = []
    for plugin in entry_points(group=PLUGINS_GROUP):
        if names is None or plugin.name in names:
            plugin.load()()
            loaded.append(plugin.name)
    return loaded


def bundle_order(group: Any, world_size: int) -> list[int]:
    """The bundle of each rank, by vLLM's rules (see the module docstring)."""
    import ray
    from ray.util import placement_group_table

    specs: list[dict[str, float]] = group.bundle_specs
    for spec in specs:
        if spec.get("GPU", 0) > 1:
            raise ExecutorError("Placement group bundle cannot have more than 1 GPU.")
    gpu_bundles = [i for i, spec in enumerate(specs) if spec.get("GPU", 0)]
    if world_size > len(gpu_bundles):
        raise ExecutorError(
            "The number of required GPUs exceeds the total number of available GPUs in the "
            f"placement group. Required: {world_size}. Total: {len(gpu_bundles)}."
        )
    where = placement_group_table(group)["bundles_to_node_id"]
    given = os.environ.get("VLLM_RAY_BUNDLE_INDICES", "")
    if given:
        order = [int(i) for i in given.split(",")]
        if len(order) != world_size or len(set(order)) != len(order):
            raise ExecutorError(
                "VLLM_RAY_BUNDLE_INDICES must name world_size distinct bundles, got "
                f"{order} for {world_size}"
            )
        return order
    driver = ray.get_runtime_context().get_node_id()
    return sorted(gpu_bundles, key=lambda i: (where.get(i) != driver, where.get(i, "")))


def start_workers(world_size: int) -> list[dict[str, Any]]:
    """Load the plugins, join Ray, start one worker per rank in the group vLLM would take,
    and watch them; returns what each worker reports."""
    plugins = load_general_plugins()
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(log_to_driver=False, logging_level=logging.ERROR)
    group = ray.util.get_current_placement_group()
    if group is None:
        raise ExecutorError(
            "no current placement group (plugins loaded: "
            f"{', '.join(plugins) or 'none'}): vLLM would create a group of its own and "
            "wait for GPUs that the replica's group holds"
        )
    order = bundle_order(group, world_size)

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, rank: int, bundle: int) -> None:
            self.rank, self.bundle = rank, bundle

        def where(self) -> dict[str, Any]:
            return {
                "rank": self.rank,
                "bundle": self.bundle,
                "node_id": ray.get_runtime_context().get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "pid": os.getpid(),
                # Started by the engine's own interpreter (the stand-in's), not the raylet's.
                "engine_python": os.environ.get("FAKE_VLLM_PYTHON") == "1",
            }

    workers = [
        Worker.options(  # type: ignore[attr-defined]
            num_gpus=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=bundle
            ),
        ).remote(rank, bundle)
        for rank, bundle in enumerate(order)
    ]
    ranks: list[dict[str, Any]] = ray.get([w.where.remote() for w in workers], timeout=60)
    threading.Thread(target=_watch, args=(workers,), daemon=True).start()
    return ranks


def _watch(workers: list[Any]) -> None:
    import ray

    while True:
        try:
            ray.get([w.where.remote() for w in workers], timeout=10)
        except Exception as exc:
            # As vLLM's engine does when a worker is lost: the whole engine stops.
            print(f"a Ray worker of this engine is gone: {exc!r}", file=sys.stderr, flush=True)
            os._exit(1)
        threading.Event().wait(WATCH_INTERVAL_S)
