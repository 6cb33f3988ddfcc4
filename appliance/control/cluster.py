"""The cluster that plans are made for: Ray's view of its nodes wherever there is one.

    where                               what `plan`, `model add` and `cost` place on
    the appliance is running            the nodes its supervisor last saw in Ray (status file)
    [ray].address set, appliance down   Ray's nodes, asked by a short-lived driver process
    one host, no Ray running            this host's GPUs (nvidia-smi), named as its Ray will be

The supervisor places on Ray's nodes too (`placement.fit`), every second, so a plan and
the replicas it becomes are decided by the same rules on the same view. On one host
without a running Ray nothing is started to plan: the embedded Ray names its node after
the host, which is the name nvidia-smi's view gets.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from appliance.config import ApplianceConfig
from appliance.control.records import ClusterNode
from appliance.control.runtime import read_status, supervisor_env
from appliance.errors import ClusterError
from appliance.placement import Cluster, local_cluster
from appliance.state import State


@dataclass(frozen=True)
class ClusterView:
    cluster: Cluster
    source: str  # where the nodes were read, for people: "Ray at 10.0.0.11:6379"


def ray_nodes(nodes: list[dict[str, Any]], free: dict[str, dict[str, float]]) -> list[ClusterNode]:
    """`ray.nodes()` and Ray's free resources per node id, as the status file carries them."""
    return [
        ClusterNode(
            name=n.name,
            node_id=n.node_id,
            gpu=n.gpu,
            accelerator=n.accelerator,
            gpus=n.gpus,
            free_gpus=int(free.get(n.node_id, {}).get("GPU", 0)),
        )
        for n in Cluster.from_ray(nodes).nodes
    ]


def cluster_view(config: ApplianceConfig) -> ClusterView:
    """The nodes plans are made for now: see the table above."""
    status = read_status(config)
    if status is not None and not status.stale and status.nodes:
        return ClusterView(
            Cluster(tuple(n.node() for n in status.nodes)).with_gpus(),
            f"the running appliance's Ray cluster at {status.ray_address}",
        )
    if config.ray.address:
        return ClusterView(_ask_ray(config), f"Ray at {config.ray.address}")
    # local_cluster names the host as the embedded Ray does (supervisor: _node_name).
    return ClusterView(local_cluster(config.ray.num_gpus), "this host (nvidia-smi)")


def given_or_viewed(config: ApplianceConfig, gpus: str | None) -> Cluster:
    """`--gpus` text when given (ValueError says what is wrong with it), else the view."""
    return Cluster.parse(gpus) if gpus is not None else cluster_view(config).cluster


def free_cluster(config: ApplianceConfig, replanning: str | None = None) -> Cluster:
    """The cluster's GPUs less those the other added models' plans hold.

    `replanning` names a model being planned again: its own GPUs count as free.
    """
    used: Counter[str] = Counter()
    for dep in State(config.state_db).deployments():
        if dep.model != replanning:
            used.update(dep.plan.gpus_per_node())
    return cluster_view(config).cluster.without(used)


def _ask_ray(config: ApplianceConfig) -> Cluster:
    # A process of its own: Ray reads its settings when imported and installs signal
    # handlers in the driver, neither of which the CLI should inherit.
    argv = [sys.executable, "-m", "appliance.control.cluster", str(config.ray.address)]
    env = {**os.environ, **supervisor_env(config)}
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        tail = "" if done is None else done.stderr.strip().splitlines()[-1:]
        raise ClusterError(
            f"could not read the cluster's nodes from Ray at {config.ray.address}"
            + (f": {tail[0]}" if tail else " within 90 s"),
            hint="Check that the Ray head is up (`systemctl status appliance-ray` on it), "
            "or plan for given GPUs with `appliance plan NAME --gpus 2x8xH100`.",
        )
    return Cluster.from_ray(json.loads(done.stdout)).with_gpus()


def main() -> None:
    """`python -m appliance.control.cluster ADDRESS`: ray.nodes() as JSON on stdout."""
    import ray

    ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)
    try:
        print(json.dumps(ray.nodes()))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
