"""The supervisor's placement check, without Ray."""

from __future__ import annotations

import logging

import pytest

from appliance.control.supervisor import fit_replicas
from appliance.planner import Plan


def _plan(replicas: int, gpus: int, placement: tuple[tuple[str, ...], ...] = ()) -> Plan:
    return Plan(
        engine="vllm",
        precision="bf16",
        replicas=replicas,
        tensor_parallel=gpus or 1,
        gpus_per_replica=gpus,
        placement=placement,
    )


def test_replicas_fit_inside_one_node_each() -> None:
    fits = fit_replicas([("a", _plan(3, 4))], {"n1": 8, "n2": 4})
    assert fits == {"a": (3, "")}
    # 4 GPUs free across two nodes is not room for a TP-4 replica.
    fits = fit_replicas([("a", _plan(2, 4))], {"n1": 2, "n2": 2})
    assert fits["a"][0] == 0 and "each needs 4 GPUs on one node" in fits["a"][1]


def test_models_take_gpus_in_the_order_they_were_added() -> None:
    fits = fit_replicas([("first", _plan(1, 4)), ("second", _plan(2, 4))], {"n1": 8})
    assert fits["first"] == (1, "")
    assert fits["second"][0] == 1
    assert fits["second"][1].startswith("1 of 2 replicas placed")


def test_best_fit_keeps_room_for_big_replicas() -> None:
    # The TP-2 replica goes to the 2-GPU node, leaving the 8-GPU node whole for TP-8.
    fits = fit_replicas([("small", _plan(1, 2)), ("big", _plan(1, 8))], {"a": 8, "b": 2})
    assert fits == {"small": (1, ""), "big": (1, "")}


def test_cpu_and_multi_node_plans_are_not_counted_here() -> None:
    multi = _plan(1, 8, placement=(("node-0", "node-1"),))
    fits = fit_replicas([("cpu", _plan(2, 0)), ("multi", multi)], {})
    assert fits == {"cpu": (2, ""), "multi": (1, "")}


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


def test_every_replica_on_a_node_counts_against_it() -> None:
    fits = fit_replicas([("a", _plan(2, 4)), ("b", _plan(1, 4))], {"n1": 8})
    assert fits["a"] == (2, "")
    assert fits["b"][0] == 0 and "the nodes have 0 GPUs free" in fits["b"][1]


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
