"""How many replicas each model gets: autoscaling within the GPU pool, and scale to zero.

The supervisor asks `Scaler.decide` once a reconcile (every second) and sets the counts
in Ray Serve (docs/scaling.md has the knobs, docs/architecture.md why the decision is
made here and not by a Serve autoscaling policy). Per model it is given:

    policy   its [models.NAME] bounds, target_queue, idle_after_s, downscale_delay_s and
             priority (`Policy.of`; no bounds set: the plan's replica count, fixed)
    queue    requests running and waiting in its engines (the replicas' load reports)
             plus the requests the gateway holds for it (every worker's, via the registry)
    idle_s   seconds since any gateway worker last saw a request for it

and a `fits` callable: which of an allocation (model -> replicas) the GPUs hold, by the
placer's rules (`appliance.placement.fit`). The rules:

    wanted   ceil(queue / target_queue) within [min_replicas, max_replicas]. A model with
             min_replicas = 0 keeps one replica until idle_after_s pass with no request
             and nothing queued, then goes to zero; at zero, the first request brings
             one back: one, however many arrived (they wait in the gateway), and no
             more until that one answers.
    up       at once, one replica at a time while `fits` holds the allocation. When it
             does not, an autoscaled model of lower priority gives up a replica that is
             idle (beyond its min_replicas and what its requests running and waiting
             need now: a replica kept only for idle_after_s or a down-scale delay goes);
             when none has one, the shortfall is the model's message ("wanted 3, have 2:
             no free GPUs").
    down     once wanted has stayed below the count for downscale_delay_s, to the most
             wanted in that time (a dip does not tear down a replica that takes minutes
             to start again); to zero as soon as idle_after_s is reached.

Models are served in priority order (highest first, then the order they were added),
which is also the order the placer packs them in. Every change is an action, counted
per model and logged by the supervisor: up, down, to_zero, from_zero, reclaimed (this
model gave a replica up), blocked (it could not grow).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from appliance.config import ModelOverride
from appliance.placement import Fit

ACTIONS = ("up", "down", "to_zero", "from_zero", "reclaimed", "blocked")


@dataclass(frozen=True)
class Policy:
    """A model's scaling settings, resolved from its [models.NAME] table and plan."""

    min_replicas: int
    max_replicas: int
    target_queue: float = 4.0
    idle_after_s: float = 300.0
    downscale_delay_s: float = 60.0
    priority: int = 0
    autoscaled: bool = False

    @classmethod
    def of(cls, override: ModelOverride | None, plan_replicas: int) -> Policy:
        settings = override or ModelOverride()
        low = high = plan_replicas
        if settings.autoscaled:
            low = settings.min_replicas if settings.min_replicas is not None else 1
            high = settings.max_replicas or max(plan_replicas, low, 1)
        return cls(
            low,
            high,
            target_queue=settings.target_queue,
            idle_after_s=settings.idle_after_s,
            downscale_delay_s=settings.downscale_delay_s,
            priority=settings.priority,
            autoscaled=settings.autoscaled,
        )


@dataclass(frozen=True)
class Load:
    """What a model has to do now."""

    queue: float = 0.0  # running + waiting in its engines, plus held in the gateway
    held: int = 0  # requests the gateway holds for it (waiting for a replica)
    idle_s: float | None = None  # since its last request, as the gateway saw it
    routable: int = 0  # replicas that take requests now


@dataclass(frozen=True)
class Model:
    name: str
    policy: Policy
    load: Load
    added_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    target: int  # replicas to ask of Serve
    wanted: int  # what its demand asks for, within its bounds
    message: str = ""  # why it has fewer than wanted, or that it is at zero
    actions: tuple[str, ...] = ()  # what changed this time (see ACTIONS)
    blocked: bool = False  # it wants more than the GPUs give it


@dataclass
class _Memory:
    """What the scaler keeps about a model between decisions."""

    seen_at: float
    active_at: float  # last time it had a request or work
    target: int = 0
    started: bool = False  # it has had a replica count above zero set
    zero_at: float | None = None  # when it went to zero
    waking: bool = False  # brought back from zero, its first replica not up yet
    low_since: float | None = None  # wanted has been below target since
    low_peak: int = 0  # the most wanted since then
    zero_why: str = ""  # why it went to zero
    blocked_at: float | None = None  # last time it wanted more than the GPUs gave it
    blocked_message: str = ""
    blocked_want: int = 0
    decisions: Counter[str] = field(default_factory=Counter)


# Which models fit: the allocation (model -> replicas) as the placer would place it.
Fits = Callable[[Mapping[str, int]], Mapping[str, Fit]]


class Scaler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._memory: dict[str, _Memory] = {}

    def decisions(self, model: str) -> dict[str, int]:
        """Actions taken for the model since the supervisor started, by kind."""
        memory = self._memory.get(model)
        return dict(memory.decisions) if memory is not None else {}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is kept about models no longer deployed."""
        kept = set(keep)
        self._memory = {m: v for m, v in self._memory.items() if m in kept}

    def _need(self, model: Model, memory: _Memory, now: float) -> int:
        """Replicas its demand asks for now, within its bounds (no delays applied)."""
        policy, load = model.policy, model.load
        want = math.ceil(load.queue / policy.target_queue) if load.queue > 0 else 0
        if policy.min_replicas == 0 and memory.target == 0:
            # At zero: one replica for whatever waits (or at the start, to show it runs).
            woken = memory.zero_at is not None and memory.active_at > memory.zero_at
            want = 1 if load.held > 0 or woken or not memory.started else 0
        elif policy.min_replicas == 0:
            if now - memory.active_at < policy.idle_after_s:
                want = max(want, 1)
            if memory.waking:
                want = min(want, 1)  # its first replica answers before more start
        return max(policy.min_replicas, min(policy.max_replicas, want))

    def _goal(self, model: Model, memory: _Memory, now: float) -> tuple[int, int]:
        """(wanted now, the count to ask for once the down-scale delay is applied)."""
        want = self._need(model, memory, now)
        if want >= memory.target or want == 0:
            memory.low_since = None
            return want, want
        if memory.low_since is None:
            memory.low_since, memory.low_peak = now, want
        memory.low_peak = max(memory.low_peak, want)
        if now - memory.low_since >= model.policy.downscale_delay_s:
            memory.low_since = None
            return want, memory.low_peak
        return want, memory.target

    def decide(self, models: list[Model], fits: Fits) -> dict[str, Decision]:
        now = self._clock()
        order = sorted(models, key=lambda m: (-m.policy.priority, m.added_at, m.name))
        memories: dict[str, _Memory] = {}
        wanted: dict[str, int] = {}
        goal: dict[str, int] = {}
        keep: dict[str, int] = {}
        for model in order:
            memory = self._memory.get(model.name)
            if memory is None:
                memory = self._memory[model.name] = _Memory(seen_at=now, active_at=now)
            if model.load.queue > 0 or model.load.held > 0:
                memory.active_at = now
            if model.load.idle_s is not None:
                memory.active_at = max(memory.active_at, now - model.load.idle_s)
            if model.load.routable > 0:
                memory.waking = False
            elif memory.target > 0:
                memory.active_at = now  # idle counts from when a replica is up
            memories[model.name] = memory
            wanted[model.name], goal[model.name] = self._goal(model, memory, now)
            # What it keeps when a model of higher priority needs GPUs: its minimum and
            # the replicas its work needs now; an idle replica held for idle_after_s or
            # through a down-scale delay is given up.
            load, policy = model.load, model.policy
            busy = math.ceil(load.queue / policy.target_queue) if load.queue > 0 else 0
            keep[model.name] = max(policy.min_replicas, busy, 1 if load.held else 0)

        # What each keeps (down-scales take effect), less what no longer fits (a node gone).
        alloc = {m.name: min(memories[m.name].target, goal[m.name]) for m in order}
        placed = fits(alloc)
        alloc = {name: min(count, placed[name].replicas) for name, count in alloc.items()}
        reclaimed: Counter[str] = Counter()
        blocked: dict[str, str] = {}
        for model in order:
            name = model.name
            while alloc[name] < goal[name]:
                trial = {**alloc, name: alloc[name] + 1}
                if _holds(fits(trial), trial):
                    alloc = trial
                    continue
                victim = self._victim(model, order, alloc, keep, trial, fits)
                if victim is None:
                    blocked[name] = self._shortfall(model, goal[name], alloc, fits)
                    break
                trial[victim] -= 1
                alloc = trial
                goal[victim] = min(goal[victim], alloc[victim])
                reclaimed[victim] += 1

        decisions: dict[str, Decision] = {}
        for model in order:
            name = model.name
            memory = memories[name]
            before, after = memory.target, alloc[name]
            actions: list[str] = []
            if reclaimed[name]:
                actions.append("reclaimed")
            elif after > before:
                actions.append("from_zero" if before == 0 and memory.started else "up")
            elif after < before:
                actions.append("to_zero" if after == 0 else "down")
            # A shortfall is reported until it has been gone for the down-scale delay (or
            # the model has what it wanted): demand read a second apart wobbles, and a
            # message that comes and goes helps nobody. Counted once per episode.
            hold = max(1.0, model.policy.downscale_delay_s)
            recent = memory.blocked_at is not None and now - memory.blocked_at < hold
            if name in blocked:
                if not recent:
                    actions.append("blocked")
                memory.blocked_at, memory.blocked_message = now, blocked[name]
                memory.blocked_want = goal[name]
            is_blocked = name in blocked or (recent and after < memory.blocked_want)
            if after == 0 and before > 0:
                memory.zero_at = now
                memory.zero_why = (
                    "its idle replica went to a model of higher priority"
                    if reclaimed[name]
                    else f"idle for {now - memory.active_at:.0f}s (idle_after_s "
                    f"{model.policy.idle_after_s:g})"
                )
            if after > 0 and before == 0 and memory.started:
                memory.waking = model.load.routable == 0
            if after > 0:
                memory.started = True
            memory.target = after
            memory.decisions.update(actions)
            message = memory.blocked_message if is_blocked else ""
            if not message and after == 0 and model.policy.min_replicas == 0 and memory.started:
                message = f"scaled to zero: {memory.zero_why}; the next request starts a replica"
            decisions[name] = Decision(after, wanted[name], message, tuple(actions), is_blocked)
        return decisions

    def _victim(
        self,
        model: Model,
        order: list[Model],
        alloc: Mapping[str, int],
        keep: Mapping[str, int],
        trial: Mapping[str, int],
        fits: Fits,
    ) -> str | None:
        """A model of lower priority with a replica it does not need now (beyond what it
        keeps), whose giving it up lets `trial` fit: the lowest priority first, then the
        newest."""
        candidates = [
            other
            for other in order
            if other.policy.priority < model.policy.priority
            and other.policy.autoscaled
            and alloc[other.name] > keep[other.name]
        ]
        candidates.sort(key=lambda m: (m.policy.priority, -m.added_at))
        for other in candidates:
            smaller = {**trial, other.name: alloc[other.name] - 1}
            if _holds(fits(smaller), smaller):
                return other.name
        return None

    def _shortfall(self, model: Model, goal: int, alloc: Mapping[str, int], fits: Fits) -> str:
        have = alloc[model.name]
        if not model.policy.autoscaled:
            # As the placer words it, for the plan's count ("2 of 3 replicas placed: ...").
            return fits({**alloc, model.name: goal})[model.name].message
        return (
            f"wanted {goal}, have {have}: no free GPUs for another replica, and no model of "
            "lower priority has an idle replica to give up"
        )


def _holds(placed: Mapping[str, Fit], alloc: Mapping[str, int]) -> bool:
    return all(placed[name].replicas >= count for name, count in alloc.items())
