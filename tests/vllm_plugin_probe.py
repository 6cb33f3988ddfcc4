"""Run by tests/test_vllm_plugin.py in a process of its own (the plugin changes `ray.util`
for the whole process, and Ray stays out of pytest's): a local Ray with 4 declared GPUs,
a placement group shaped as the supervisor asks Serve for one (TP 2 x PP 2), the plugin
loaded through its entry point as vLLM loads it, then what vLLM would see. Where vLLM is
importable (its CPU build's environment), its own `initialize_ray_cluster` and bundle
functions run against the group. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ray
from ray.util import placement_group, remove_placement_group

from appliance.control import PLACEMENT_GROUP_ENV
from appliance.testing.ray_executor import PLUGINS_GROUP, load_general_plugins

TP, PP = 2, 2


def _vllm(out: dict[str, Any]) -> None:
    try:
        from vllm.config import ParallelConfig
        from vllm.platforms import current_platform
        from vllm.plugins import load_general_plugins as vllm_load_general_plugins
        from vllm.v1.executor import ray_utils
    except ImportError:
        return
    # vLLM's own loader, as its processes call it (the plugin's second call is a no-op).
    vllm_load_general_plugins()
    # The CPU platform has no Ray device; a CUDA platform's is "GPU".
    type(current_platform).ray_device_key = "GPU"
    config = ParallelConfig(
        tensor_parallel_size=TP, pipeline_parallel_size=PP, distributed_executor_backend="ray"
    )
    ray_utils.initialize_ray_cluster(config)  # the executor's first step; no engine
    group = config.placement_group
    by_node = ray_utils.get_bundles_sorted_by_node(group)
    given = [int(i) for i in os.environ["VLLM_RAY_BUNDLE_INDICES"].split(",")]
    out["vllm"] = {
        "group": group.id.hex(),
        "sorted_by_node": [b for b, _, _ in by_node],
        "for_indices": [b for b, _, _ in ray_utils.get_bundles_for_indices(group, given, TP * PP)],
    }


def main() -> None:
    ray.init(num_cpus=1, num_gpus=TP * PP, include_dashboard=False, log_to_driver=False)
    rank = {"GPU": 1.0}
    group = placement_group([{"CPU": 1.0, **rank}, *[dict(rank)] * (TP * PP - 1)], "PACK")
    ray.get(group.ready(), timeout=60)
    out: dict[str, Any] = {"created": group.id.hex()}
    untouched = ray.util.get_current_placement_group()
    out["before"] = None if untouched is None else untouched.id.hex()
    try:
        from appliance.control.replica import rank_layout
    except ImportError:  # vLLM's environment: none of the appliance's dependencies
        order = None
    else:
        node = ray.get_runtime_context().get_node_id()
        layout = rank_layout(group, TP, node)
        out["layout"] = [r.model_dump() for r in layout]
        order = [r.bundle for r in layout]
        try:
            rank_layout(group, 3, node)  # 4 GPUs on one node hold no whole TP-3 groups
        except Exception as exc:
            out["split"] = str(exc)
    os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, order or range(TP * PP)))
    os.environ[PLACEMENT_GROUP_ENV] = group.id.hex()
    out["plugins"] = load_general_plugins()
    current = ray.util.get_current_placement_group()
    out["current"] = current.id.hex()
    out["bundle_specs"] = current.bundle_specs
    _vllm(out)
    remove_placement_group(group)
    try:
        ray.util.get_current_placement_group()
    except Exception as exc:
        out["removed"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    assert PLUGINS_GROUP == "vllm.general_plugins"
    sys.exit(main())
