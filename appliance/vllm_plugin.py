"""A vLLM general plugin: the engine of a replica whose stages span nodes runs its Ray
workers in the replica's placement group.

vLLM's Ray executor (`initialize_ray_cluster` in vllm/v1/executor/ray_utils.py, 0.32)
takes `parallel_config.placement_group` or else `ray.util.get_current_placement_group()`,
which is the group only inside a Ray task or actor of it. The engine is a process the
replica starts, not an actor, so there it is None and vLLM would create a group of its own
and wait for GPUs the replica's group already holds. vLLM loads every entry point of the
`vllm.general_plugins` group in each of its processes (API server, engine core, workers);
this one, when APPLIANCE_PLACEMENT_GROUP names a group, makes
`ray.util.get_current_placement_group()` answer that group. The replica sets
VLLM_RAY_BUNDLE_INDICES beside it (control/replica.py `rank_layout`): which bundle each
rank takes. Without the variable the plugin does nothing.

Only the standard library and Ray are imported here (the engine's environment has Ray
and not the appliance's other dependencies); Ray only when a group is named.
"""

from __future__ import annotations

import os
from typing import Any

from appliance.control import PLACEMENT_GROUP_ENV


class GroupGone(RuntimeError):
    """The placement group the engine was started in is no longer usable."""


def register() -> None:
    """The entry point vLLM calls (again in every process; a second call changes nothing)."""
    group_id = os.environ.get(PLACEMENT_GROUP_ENV, "").strip()
    if not group_id:
        return
    try:
        group_bytes = bytes.fromhex(group_id)
    except ValueError:
        raise GroupGone(
            f"{PLACEMENT_GROUP_ENV}={group_id!r} is not a placement group id (hex); the "
            "replica sets it, so the engine was started by something else"
        ) from None
    import ray.util

    current = ray.util.get_current_placement_group
    if getattr(current, "appliance_group", None) == group_id:
        return

    def replica_group() -> Any:
        return _group(group_bytes)

    replica_group.appliance_group = group_id  # type: ignore[attr-defined]
    # vLLM looks the function up on `ray.util` at each call; Ray's own code imports it
    # from ray.util.placement_group, which stays as it is.
    ray.util.get_current_placement_group = replica_group


def _group(group_id: bytes) -> Any:
    """The replica's group, checked alive; joins Ray (RAY_ADDRESS) if this process has not."""
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            raise GroupGone(
                f"{PLACEMENT_GROUP_ENV} is set but RAY_ADDRESS is not: the engine cannot "
                "reach the Ray cluster its placement group is in"
            )
        ray.init(address=address, log_to_driver=False)
    group = PlacementGroup(ray.PlacementGroupID(group_id))
    state = placement_group_table(group).get("state")
    if state != "CREATED":
        raise GroupGone(
            f"the replica's placement group {group_id.hex()} is {state or 'unknown to Ray'}: "
            "its replica is gone or a node holding its GPUs was lost; Serve starts a new "
            "replica with a new group"
        )
    return group
