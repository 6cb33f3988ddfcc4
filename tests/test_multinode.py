"""A replica whose pipeline stages span two nodes, on a real two-node Ray cluster.

The cluster runs on this machine (tests/raycluster.py: two raylets, 2 declared H100s
each, no real GPUs); the appliance joins it with `[ray].address`. The model is planned
TP 2 x PP 2, so each replica needs both nodes. The stand-in for vLLM (the fake engine
taking vLLM's command line) loads the appliance's vLLM plugin through its entry point and,
as vLLM's Ray executor does, takes the group the plugin gives it and runs one Ray worker
per rank in the bundle VLLM_RAY_BUNDLE_INDICES names, reporting what each worker sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.catalog import ModelEntry, load_catalog
from appliance.config import load_config
from appliance.control.runtime import supervisor_env
from appliance.planner import Plan
from appliance.state import State
from tests.conftest import ApplianceUnderTest, install_unread_weights, vllm_stand_in

pytestmark = pytest.mark.e2e

MODEL = "llama-3.1-8b-instruct"
REPO = Path(__file__).resolve().parent.parent


class RayCluster:
    """tests/raycluster.py in its own process: Ray stays out of pytest's."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        with log.open("ab") as output:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.raycluster", "2", "H100"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=output,
                text=True,
                cwd=REPO,
                env=env,
            )
        self.address = str(self._answer()["address"])

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith("{"):  # Ray may print its own lines too
                return dict(json.loads(line))
        raise AssertionError(f"the Ray cluster process exited with {self.proc.wait()}")

    def command(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TwoNodes(ApplianceUnderTest):
    def __init__(self, root: Path) -> None:
        super().__init__(root, f'[engines.vllm]\ncommand = "{vllm_stand_in(root)}"\n')
        # Ray's settings as the supervisor's with [ray].address set: token auth with the
        # appliance's own token, nodes on the host's address (the single-host setting
        # would bind the cluster to loopback, where a joining driver does not look).
        env = supervisor_env(load_config(self.config))
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        self.ray_env = {**os.environ, **env}
        self.ray = RayCluster({**self.ray_env, "PYTHONPATH": str(REPO)}, root / "ray.log")
        with self.config.open("a") as f:
            f.write(f'[ray]\naddress = "{self.ray.address}"\n')


def _wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    c = TwoNodes(tmp_path_factory.mktemp("multinode"))
    try:
        install_unread_weights(c.home, MODEL)
        # The deployment record's own entry: the replica must run this one, not the
        # catalog's (whose tool parser is llama3_json).
        catalog = load_catalog(None).get(MODEL).model_dump(mode="json")
        entry = ModelEntry.model_validate_json(json.dumps({**catalog, "tool_parser": "hermes"}))
        # TP 2 x PP 2 on 2 H100s per node: each replica needs both nodes.
        shape: dict[str, Any] = {
            "tensor_parallel": 2,
            "pipeline_parallel": 2,
            "gpus_per_replica": 4,
        }
        plan = Plan("vllm", "bf16", gpu="H100-80GB", placement=(("a", "b"),), **shape)
        State(c.home / "state.db").add_deployment(MODEL, plan, entry)
        up = c.cli("up", "--timeout", "120")
        assert up.returncode == 0, up.stdout + up.stderr
        yield c
    finally:
        c.cli("down", timeout=120)
        c.ray.stop()


def _replica(c: TwoNodes) -> dict[str, Any] | None:
    replicas = c.status()["models"][MODEL]["replicas"]
    healthy = [r for r in replicas if r["healthy"] and r["fresh"]]
    return healthy[0] if healthy else None


def test_a_replica_spans_two_nodes_and_each_stage_sees_its_own_gpus(two_nodes: TwoNodes) -> None:
    c = two_nodes
    status = c.status()
    nodes = status["nodes"]
    assert [(n["gpu"], n["gpus"]) for n in nodes] == [("H100-80GB", 2)] * 2
    replica = _replica(c)
    assert replica is not None
    ranks = replica["ranks"]
    # One rank per GPU, in vLLM's order (rank = stage * TP + TP rank): TP 2 x PP 2.
    assert [(r["rank"], r["stage"]) for r in ranks] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    by_stage = {s: {r["node_id"] for r in ranks if r["stage"] == s} for s in (0, 1)}
    assert all(len(nodes_of) == 1 for nodes_of in by_stage.values())  # a TP group: one node
    assert by_stage[0] != by_stage[1]  # one stage on each node
    assert by_stage[0] | by_stage[1] == {n["node_id"] for n in nodes}
    assert sorted(r["bundle"] for r in ranks) == [0, 1, 2, 3]
    assert replica["gpu_ids"] == []  # the replica holds none: its engine's workers do

    launch = httpx.get(replica["url"] + "/debug/launch").json()
    argv = launch["argv"]
    flags = {f: argv[argv.index(f) + 1] for f in argv if f.startswith("--") and f != argv[-1]}
    assert flags["--distributed-executor-backend"] == "ray"
    assert flags["--tensor-parallel-size"] == "2"
    assert flags["--pipeline-parallel-size"] == "2"
    assert flags["--tool-call-parser"] == "hermes"  # the record's entry, not the catalog's
    assert launch["ray_address"] == status["ray_address"]
    assert launch["bundle_indices"] == ",".join(str(r["bundle"]) for r in ranks)
    workers = launch["ranks"]
    # The stand-in found the group through the plugin's entry point, as vLLM does, and
    # put rank r on the bundle status names for it, on that bundle's node.
    assert [(w["rank"], w["bundle"], w["node_id"]) for w in workers] == [
        (r["rank"], r["bundle"], r["node_id"]) for r in ranks
    ]
    # Each rank runs in the engine's Python (as vLLM's workers must), not the raylet's.
    assert all(w["engine_python"] for w in workers), workers
    # Each rank sees one GPU of its own; a node's two ranks see different ones.
    for stage in (0, 1):
        seen = [w["cuda_visible_devices"] for w in workers if w["rank"] // 2 == stage]
        assert sorted(seen) == ["0", "1"]
    text = c.cli("status").stdout
    for r in ranks:
        assert f"rank {r['rank']} (stage {r['stage']}) on {r['node']}" in text

    client = openai.OpenAI(base_url=c.base, api_key=c.key, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    # For the closing note: where each rank runs, and what the head was started with.
    print("\nnodes:", json.dumps([{k: n[k] for k in ("name", "gpu", "gpus")} for n in nodes]))
    for rank, worker in zip(ranks, workers, strict=True):
        print(
            f"rank {rank['rank']} (stage {rank['stage']}): node {rank['node']} "
            f"({rank['node_id'][:12]}), bundle {rank['bundle']}, worker pid {worker['pid']} "
            f"CUDA_VISIBLE_DEVICES={worker['cuda_visible_devices']}"
        )
    print("head:", " ".join(argv[argv.index("--tensor-parallel-size") :]))


def test_plan_plans_for_the_cluster_not_this_host(two_nodes: TwoNodes) -> None:
    done = two_nodes.cli("plan", MODEL, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["cluster"] == "2x2xH100-80GB"


def test_with_the_appliance_down_plans_ask_ray_at_its_address(two_nodes: TwoNodes) -> None:
    # What `model add` and `plan` read when [ray].address is set and no supervisor runs.
    from appliance.control.cluster import _ask_ray

    cluster = _ask_ray(load_config(two_nodes.config))
    assert cluster.describe() == "2x2xH100-80GB"
    assert all(n.node_id and n.accelerator == "H100" for n in cluster.nodes)


def test_losing_a_node_fails_the_replica_and_a_new_node_brings_it_back(
    two_nodes: TwoNodes,
) -> None:
    c = two_nodes
    before = _replica(c)
    assert before is not None
    c.ray.command("remove")
    lost = _wait(
        "the model reports it cannot place its replica",
        lambda: "0 of 1 replicas placed" in c.status()["models"][MODEL]["message"] or None,
        45,
    )
    assert lost
    assert _replica(c) is None
    print("\nafter losing a node:", c.status()["models"][MODEL]["message"])
    added = c.ray.command("add")["added"]
    after = _wait("a replica on the new node", lambda: _replica(c), 60)
    assert after["replica_id"] != before["replica_id"]
    assert added in {r["node_id"] for r in after["ranks"]}
