"""The supervisor without Ray: what it asks Ray to reserve, its errors and its loop."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from appliance.config import load_config
from appliance.control.records import ClusterNode, RegistrySnapshot, ReplicaState
from appliance.control.supervisor import Supervisor
from appliance.planner import Plan


def test_a_failed_replica_is_reported_by_its_own_error() -> None:
    from appliance.control.supervisor import _our_error

    serve_text = (
        "The deployment failed to start 3 times in a row.\n"
        "Traceback (most recent call last):\n  File ...\n"
        "ray.exceptions.RayTaskError(EngineError): ray::ServeReplica...\n"
        "appliance.errors.EngineError: cannot start the vllm engine: vllm: No such file\n"
        "Install it in its own virtualenv and set engines.vllm.command."
    )
    assert _our_error(serve_text) == (
        "cannot start the vllm engine: vllm: No such file\n"
        "Install it in its own virtualenv and set engines.vllm.command."
    )
    assert _our_error("Deploying.") == "Deploying."


def test_a_failing_loop_step_is_logged_once_backed_off_and_recovers(
    appliance_home: object, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.config import load_config
    from appliance.control import supervisor as module

    caplog.set_level(logging.INFO, logger="appliance.supervisor")
    sup = module.Supervisor(load_config())
    calls: list[int] = []
    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])

    def full() -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    for _ in range(5):  # every second for 5 s, as the loop would
        sup._step("status", full)
        clock[0] += 1.0
    failures = [r for r in caplog.records if "status failed" in r.getMessage()]
    assert len(failures) == 1  # once per condition, not once a second
    assert "No space left on device" in failures[0].getMessage()
    assert len(calls) == 3  # tried at 0 s, then after 1 s and 2 s of back-off
    clock[0] += 30
    sup._step("status", lambda: None)
    assert "status works again" in caplog.records[-1].getMessage()
    assert sup.failing == {}


def _supervisor() -> Supervisor:
    sup = Supervisor(load_config())
    sup.nodes = [
        ClusterNode(name=f"n{i}", node_id=f"id{i}", gpu="H100-80GB", accelerator="H100", gpus=8)
        for i in range(2)
    ]
    return sup


@pytest.mark.usefixtures("appliance_home")
def test_a_one_node_replica_holds_its_gpus_on_a_node_of_its_type() -> None:
    sup = _supervisor()
    plan = Plan(
        engine="vllm", precision="bf16", tensor_parallel=4, gpus_per_replica=4, gpu="H100-80GB"
    )
    assert sup._resources(plan) == {
        "ray_actor_options": {
            "num_cpus": 1.0,
            "num_gpus": 4,
            "resources": {"accelerator_type:H100": 0.001},
        }
    }
    cpu = Plan(engine="vllm", precision="fp32")
    assert sup._resources(cpu) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0}}


@pytest.mark.usefixtures("appliance_home")
def test_a_replica_across_nodes_gets_one_bundle_per_gpu_as_vllm_requires() -> None:
    sup = _supervisor()
    # Llama 3.1 405B in BF16 on two nodes of 8 H100s: TP 8 x PP 2.
    one_node = Plan("vllm", "bf16", tensor_parallel=8, gpus_per_replica=8, gpu="H100-80GB")
    plan = replace(one_node, pipeline_parallel=2, gpus_per_replica=16, placement=(("n0", "n1"),))
    rank = {"GPU": 1.0, "accelerator_type:H100": 0.001}
    assert sup._resources(plan) == {
        # The replica holds no GPUs: its engine's Ray workers take the bundles', one
        # each (vLLM's Ray executor refuses a bundle of more); the replica's CPUs go in
        # the first, so its node holds stage 0.
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": 1.0, **rank}] + [rank] * 15,
        "placement_group_strategy": "PACK",
    }


def _replica(replica_id: str, actor: str) -> ReplicaState:
    return ReplicaState(
        replica_id=replica_id,
        model="m",
        engine="vllm",
        url="http://127.0.0.1:1",
        engine_model="m",
        healthy=True,
        actor=actor,
        fresh=True,
    )


def test_a_replica_whose_actor_is_gone_is_dropped_at_once(
    appliance_home: object, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.util

    caplog.set_level(logging.INFO, logger="appliance.supervisor")
    forgotten: list[str] = []

    class Registry:
        class forget:  # an actor method: called as .remote
            @staticmethod
            def remote(replica_id: str) -> None:
                forgotten.append(replica_id)

    sup = Supervisor(load_config())
    sup.registry = Registry()
    alive = ["SERVE_REPLICA::m#engine#aaa", "SERVE_CONTROLLER_ACTOR"]
    monkeypatch.setattr(
        ray.util,
        "list_named_actors",
        lambda all_namespaces: [{"name": n, "namespace": "serve"} for n in alive],
    )
    snapshot = RegistrySnapshot(
        replicas=[
            _replica("aaa", "SERVE_REPLICA::m#engine#aaa"),
            _replica("bbb", "SERVE_REPLICA::m#engine#bbb"),  # killed, never forgot itself
            _replica("ccc", ""),  # an older replica that names no actor: left to its age
        ]
    )
    kept = sup._drop_dead(snapshot)
    assert [r.replica_id for r in kept.replicas] == ["aaa", "ccc"]
    assert forgotten == ["bbb"]
    assert "replica bbb of m: its Ray actor is gone" in caplog.text
    assert sup._drop_dead(kept) == kept and forgotten == ["bbb"]
