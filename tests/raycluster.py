"""A Ray cluster of several nodes on this machine, run in its own process for a test.

`python -m tests.raycluster GPUS TYPE` starts a head node with 2 CPUs and GPUS declared GPUs,
and a second node with GPUS GPUs and no CPUs (so only bundles without CPUs go there),
both reporting Ray's `accelerator_type:TYPE` resource as a GPU node does. It prints one
JSON line with the GCS address, then takes commands on stdin, answering each with a JSON
line: `remove` stops the newest GPU node (as a host that dies), `add` starts another,
`quit` (or end of input) stops the cluster. Ray's own settings (token auth) come from
the environment the test gives it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ray.cluster_utils import Cluster

# Answers go to the original stdout; everything else (Ray's processes inherit fd 1) to
# stderr, so that nothing Ray prints can fill the pipe the test reads answers from.
_ANSWERS = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def _say(data: dict[str, Any]) -> None:
    print(json.dumps(data), file=_ANSWERS, flush=True)


def main() -> None:
    gpus, kind = int(sys.argv[1]), sys.argv[2]
    resources = {f"accelerator_type:{kind}": 1.0}
    # Small nodes start faster: no dashboard, a small object store, few prestarted workers.
    small = {"object_store_memory": 100 * 2**20, "resources": resources}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": gpus, "include_dashboard": False, **small},
    )
    workers = [cluster.add_node(num_cpus=0, num_gpus=gpus, **small)]
    _say({"address": cluster.address})
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "remove":
                node = workers.pop()
                cluster.remove_node(node, allow_graceful=False)
                _say({"removed": node.node_id})
            elif command == "add":
                node = cluster.add_node(num_cpus=0, num_gpus=gpus, **small)
                workers.append(node)
                _say({"added": node.node_id})
            elif command == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
