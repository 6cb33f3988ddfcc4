"""A stand-in for vLLM's Ray executor, for the fake engine given `--distributed-executor-backend
ray`: one worker per bundle of the replica's placement group.

vLLM's Ray executor runs its workers as Ray actors in the bundles of a placement group,
where Ray gives each the bundle's GPUs (CUDA_VISIBLE_DEVICES); when a worker dies, the
engine fails. This does the same with the group the replica names in
APPLIANCE_PLACEMENT_GROUP (one worker per bundle, that is per pipeline stage, holding
the stage's GPUs), reports where each worker runs and what it sees, and ends the engine
process when a worker stops answering. Only the fake engine uses it; it needs the Ray of
the appliance's own environment, which the fake engine runs in.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from appliance.control import PLACEMENT_GROUP_ENV

WATCH_INTERVAL_S = 0.5


def start_workers() -> list[dict[str, Any]]:
    """Join Ray (RAY_ADDRESS), start one worker in each bundle of the replica's group, and
    watch them; returns what each worker reports: stage, node id, CUDA_VISIBLE_DEVICES."""
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group_id = os.environ.get(PLACEMENT_GROUP_ENV)
    if not group_id:
        raise SystemExit(
            f"--distributed-executor-backend ray: no {PLACEMENT_GROUP_ENV} names the group"
        )
    ray.init(
        address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, logging_level=logging.ERROR
    )
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
    ray.get(group.ready(), timeout=60)

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, stage: int) -> None:
            self.stage = stage

        def where(self) -> dict[str, Any]:
            return {
                "stage": self.stage,
                "node_id": ray.get_runtime_context().get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "pid": os.getpid(),
            }

    workers = [
        Worker.options(  # type: ignore[attr-defined]
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=stage
            ),
        ).remote(stage)
        for stage, bundle in enumerate(group.bundle_specs)
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
