"""A Ray cluster of several nodes on this machine, run in its own process for a test.

`python -m tests.raycluster GPUS TYPE` starts a head node with CPUs and GPUS declared GPUs,
and a second node with GPUS GPUs and no CPUs (so only bundles without CPUs go there),
both reporting Ray's `accelerator_type:TYPE` resource as a GPU node does. It prints one
JSON line with the GCS address, then takes commands on stdin, answering each with a JSON
line: `remove` stops the newest GPU node (as a host that dies), `add` starts another,
`quit` (or end of input) stops the cluster. Ray's own settings (token auth) come from
the environment the test gives it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ray.cluster_utils import Cluster


def _say(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def main() -> None:
    gpus, kind = int(sys.argv[1]), sys.argv[2]
    resources = {f"accelerator_type:{kind}": 1.0}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "num_gpus": gpus, "resources": resources},
    )
    workers = [cluster.add_node(num_cpus=0, num_gpus=gpus, resources=resources)]
    _say({"address": cluster.address})
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "remove":
                node = workers.pop()
                cluster.remove_node(node, allow_graceful=False)
                _say({"removed": node.node_id})
            elif command == "add":
                node = cluster.add_node(num_cpus=0, num_gpus=gpus, resources=resources)
                workers.append(node)
                _say({"added": node.node_id})
            elif command == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
