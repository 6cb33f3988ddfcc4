"""The scaler's decisions (appliance/control/scaling.py) on the real placer, without Ray:
a clock the test moves, demand it sets, GPUs declared as text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from appliance.config import ModelOverride
from appliance.control.scaling import Load, Model, Policy, Scaler
from appliance.placement import Cluster, Fit, fit
from appliance.planner import Plan

GPU = Plan("vllm", "bf16", tensor_parallel=1, gpus_per_replica=1, gpu="H100-80GB")


class World:
    """Models on a cluster, and a scaler deciding for them each `tick`."""

    def __init__(self, gpus: str, **models: tuple[Policy, Plan]) -> None:
        self.cluster = Cluster.parse(gpus)
        self.models = models
        self.loads: dict[str, Load] = {name: Load() for name in models}
        self.now = 1000.0
        self.scaler = Scaler(clock=lambda: self.now)

    def fits(self, alloc: Mapping[str, int]) -> dict[str, Fit]:
        order = sorted(self.models, key=lambda m: -self.models[m][0].priority)
        plans = [(m, replace(self.models[m][1], replicas=alloc[m])) for m in order]
        return fit(plans, self.cluster)

    def tick(self, seconds: float = 1.0) -> dict[str, int]:
        self.now += seconds
        models = [
            Model(name, policy, self.loads[name], added_at=i)
            for i, (name, (policy, _)) in enumerate(self.models.items())
        ]
        self.last = self.scaler.decide(models, self.fits)
        return {name: d.target for name, d in self.last.items()}


def auto(low: int, high: int, **knobs: float) -> Policy:
    values = {"target_queue": 2.0, "idle_after_s": 3.0, "downscale_delay_s": 5.0, **knobs}
    return Policy(low, high, autoscaled=True, **values)  # type: ignore[arg-type]


def test_the_policy_defaults_to_the_plans_fixed_count() -> None:
    assert Policy.of(None, 3) == Policy(3, 3)
    assert Policy.of(ModelOverride(engine_args=["--x"]), 2).autoscaled is False
    scaled = Policy.of(ModelOverride(min_replicas=0), 1)
    assert (scaled.min_replicas, scaled.max_replicas, scaled.autoscaled) == (0, 1, True)
    assert Policy.of(ModelOverride(max_replicas=4), 2).min_replicas == 1
    assert Policy.of(ModelOverride(min_replicas=3), 1).max_replicas == 3


def test_a_fixed_model_keeps_its_count_whatever_the_queue() -> None:
    world = World("4xH100-80GB", fixed=(Policy(2, 2), GPU))
    assert world.tick() == {"fixed": 2}
    world.loads["fixed"] = Load(queue=50)
    assert world.tick() == {"fixed": 2}
    world.loads["fixed"] = Load()
    assert world.tick(600) == {"fixed": 2}


def test_it_scales_up_with_the_queue_at_once_and_down_after_the_delay() -> None:
    world = World("4xH100-80GB", m=(auto(1, 3), GPU))
    assert world.tick() == {"m": 1}
    world.loads["m"] = Load(queue=5, routable=1)  # 5 / target_queue 2 -> 3
    assert world.tick() == {"m": 3}
    assert world.last["m"].actions == ("up",)
    world.loads["m"] = Load(queue=1, routable=3)
    assert world.tick() == {"m": 3}  # a dip is not a trend
    world.loads["m"] = Load(queue=3, routable=3)  # wants 2 for a while
    assert world.tick(2) == {"m": 3}
    world.loads["m"] = Load(queue=0, routable=3)
    assert world.tick(4) == {"m": 2}  # to the most wanted during the delay
    assert world.last["m"].actions == ("down",)
    assert world.tick(6) == {"m": 2}  # wanted 1 from now on
    assert world.tick(5) == {"m": 1}
    assert world.scaler.decisions("m") == {"up": 2, "down": 2}


def test_scale_up_stops_where_the_gpus_do_and_says_so() -> None:
    tp2 = replace(GPU, tensor_parallel=2, gpus_per_replica=2)
    world = World("4xH100-80GB", m=(auto(1, 3), tp2))
    world.tick()
    world.loads["m"] = Load(queue=6, routable=1)
    assert world.tick() == {"m": 2}
    decision = world.last["m"]
    assert decision.blocked and decision.wanted == 3
    assert decision.message.startswith("wanted 3, have 2: no free GPUs")
    assert decision.actions == ("up", "blocked")
    world.tick()
    assert world.last["m"].actions == ()  # blocked is counted once, not every second
    world.loads["m"] = Load(queue=4, routable=2)  # a wobble: wants 2 for a moment
    world.tick()
    assert world.last["m"].blocked and world.last["m"].message.startswith("wanted 3")
    world.loads["m"] = Load(queue=6, routable=2)
    world.tick()
    assert world.last["m"].actions == ()  # the same episode
    world.loads["m"] = Load(queue=4, routable=2)
    world.tick(5)
    assert not world.last["m"].blocked and world.last["m"].message == ""
    assert world.scaler.decisions("m") == {"up": 2, "blocked": 1}


def test_a_fixed_models_shortfall_is_the_placers_message() -> None:
    tp2 = replace(GPU, gpus_per_replica=2, tensor_parallel=2)
    world = World("4xH100-80GB", m=(Policy(3, 3), tp2))
    assert world.tick() == {"m": 2}
    assert "2 of 3 replicas placed" in world.last["m"].message


def test_idle_goes_to_zero_and_one_request_or_many_bring_back_one() -> None:
    world = World("2xH100-80GB", cold=(auto(0, 2, target_queue=1.0), GPU))
    assert world.tick() == {"cold": 1}  # started once, so `up` shows it works
    world.loads["cold"] = Load(idle_s=None, routable=1)
    assert world.tick(2) == {"cold": 1}
    assert world.tick(2) == {"cold": 0}  # idle_after_s 3 passed
    assert world.last["cold"].actions == ("to_zero",)
    assert "scaled to zero" in world.last["cold"].message
    assert world.tick(60) == {"cold": 0}
    # Eight requests at once, target_queue 1: one replica, and no more while it starts.
    world.loads["cold"] = Load(queue=8, held=8, idle_s=0.1)
    assert world.tick() == {"cold": 1}
    assert world.last["cold"].actions == ("from_zero",)
    assert world.tick() == {"cold": 1}
    assert world.tick() == {"cold": 1}
    # Up: the queue it serves counts as for any model.
    world.loads["cold"] = Load(queue=8, idle_s=0.1, routable=1)
    assert world.tick() == {"cold": 2}


def test_a_request_seen_only_by_its_time_wakes_a_model_at_zero() -> None:
    world = World("1xH100-80GB", cold=(auto(0, 1), GPU))
    world.tick()
    assert world.tick(5) == {"cold": 1}  # its replica is not up yet: not idle
    world.loads["cold"] = Load(routable=1)
    world.tick()
    assert world.tick(5) == {"cold": 0}
    world.loads["cold"] = Load()
    world.loads["cold"] = Load(idle_s=30.0)  # an old request: stays at zero
    assert world.tick() == {"cold": 0}
    world.loads["cold"] = Load(idle_s=0.5)  # one since it went to zero (overflowed, say)
    assert world.tick() == {"cold": 1}


@pytest.mark.parametrize("busy", [False, True])
def test_a_higher_priority_model_takes_an_idle_replica_of_a_lower_one(busy: bool) -> None:
    world = World(
        "4xH100-80GB",
        low=(auto(1, 3), GPU),
        high=(auto(1, 3, priority=10), GPU),
    )
    world.loads["low"] = Load(queue=5, routable=1)
    assert world.tick() == {"low": 3, "high": 1}
    world.loads["low"] = Load(queue=5 if busy else 1, routable=3)
    world.loads["high"] = Load(queue=6, routable=1)
    if busy:  # low needs its three: nothing to reclaim, and the shortfall is reported
        assert world.tick() == {"low": 3, "high": 1}
        assert world.last["high"].message.startswith("wanted 3, have 1")
        return
    # low needs one (its delay not yet passed): two are taken at once for high
    assert world.tick() == {"low": 1, "high": 3}
    assert world.last["low"].actions == ("reclaimed",)
    assert world.scaler.decisions("low") == {"up": 1, "reclaimed": 1}
    assert world.tick() == {"low": 1, "high": 3}  # low does not grow back


def test_a_lower_priority_model_never_takes_from_a_higher_one() -> None:
    world = World("2xH100-80GB", high=(auto(1, 2, priority=5), GPU), low=(auto(1, 2), GPU))
    world.loads["high"] = Load(queue=4, routable=1)
    assert world.tick() == {"high": 2, "low": 0}
    world.loads["high"] = Load(queue=0, routable=2)
    world.loads["low"] = Load(queue=4)
    assert world.tick() == {"high": 2, "low": 0}  # high's delay has not passed
    assert world.last["low"].blocked


def test_a_lost_node_shrinks_the_count_to_what_still_fits() -> None:
    world = World("2x2xH100-80GB", m=(auto(1, 4), GPU))
    world.loads["m"] = Load(queue=8, routable=1)
    assert world.tick() == {"m": 4}
    world.cluster = Cluster.parse("2xH100-80GB")
    assert world.tick() == {"m": 2}


def test_an_idle_replica_kept_for_idle_after_is_reclaimed_to_zero() -> None:
    world = World(
        "2xH100-80GB",
        spare=(auto(0, 1, idle_after_s=600.0), GPU),
        high=(auto(1, 2, priority=1), GPU),
    )
    assert world.tick() == {"spare": 1, "high": 1}
    world.loads["high"] = Load(queue=4, routable=1)
    assert world.tick() == {"spare": 0, "high": 2}
    assert world.last["spare"].actions == ("reclaimed",)
    assert "scaled to zero" in world.last["spare"].message
    # It comes back when a request waits for it, and GPUs allow: not before high shrinks.
    world.loads["spare"] = Load(queue=1, held=1, idle_s=0.0)
    assert world.tick() == {"spare": 0, "high": 2}
    assert world.last["spare"].blocked


def test_every_scaling_knob_is_documented() -> None:
    from pathlib import Path

    from appliance.gateway.app import COLD_START_HEADER

    root = Path(__file__).parent.parent / "docs"
    reference = (root / "configuration.md").read_text()
    section = reference[reference.index("### `[models.NAME]`") :]
    scaling = (root / "scaling.md").read_text()
    knobs = set(ModelOverride.model_fields) - {"engine_args", "engine_env"}
    assert knobs == {
        "min_replicas",
        "max_replicas",
        "target_queue",
        "idle_after_s",
        "downscale_delay_s",
        "priority",
    }
    for name in knobs:
        assert f"| `{name}` |" in section, name
        assert f"| `{name}` |" in scaling, name
    assert "`gateway.cold_start_timeout_s`" in scaling and "`cold_start_timeout_s`" in reference
    assert COLD_START_HEADER in scaling and COLD_START_HEADER == "x-appliance-cold-start-ms"
