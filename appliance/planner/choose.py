"""Choosing: the best candidate that fits, its placement, and what to do when none fits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from appliance.catalog import ModelEntry
from appliance.errors import PlanError
from appliance.gpus import GPUS, PRECISION_ORDER, GpuSpec, find_gpu, known_gpus
from appliance.placement import Cluster, Node, Placement, place
from appliance.planner.candidates import Candidate, _Ask, tensor_parallel_sizes
from appliance.planner.memory import GIB, engine_limits
from appliance.planner.objective import Objective
from appliance.planner.plan import Plan
from appliance.planner.roofline import Workload

DEFAULT_CONTEXT_CAP = 131072  # plans serve at most 128k tokens unless --context asks more
MIN_AUTO_CONTEXT = 4096
# CPU plans (vLLM's CPU build): a short context and few sequences keep the KV cache, and
# the engine's share of a small host's cores, small.
CPU_CONTEXT = 2048
CPU_MAX_NUM_SEQS = 8
# With no GPUs, models up to this size run on the CPU: larger ones answer too slowly on a
# few cores to share (SmolLM2-135M: ~20 tokens/s per stream on one core).
CPU_MAX_PARAMS_B = 1.0
CPU_PRECISIONS = ("bf16", "fp16", "fp32")  # what vLLM's CPU build computes in
REFERENCE_CLUSTERS = ("8xH100-80GB", "8xH200")  # named when a GPU model meets no GPUs


@dataclass(frozen=True)
class PlanReport:
    """Everything `appliance plan` shows: candidates, the choice, its placement, or the problem."""

    model: str
    cluster: str
    engine: str
    context: int
    concurrency: int | None
    workload: Workload
    candidates: tuple[Candidate, ...] = ()
    chosen: Candidate | None = None
    plan: Plan | None = None
    placement: Placement | None = None
    problem: str | None = None
    hint: str | None = None
    reasons: tuple[str, ...] = field(default=())
    objective: Objective = field(default_factory=Objective)
    runner_up: Candidate | None = None
    lost_because: str | None = None  # why the runner-up was not chosen

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["workload"] = asdict(self.workload)
        data["objective"] = asdict(self.objective)
        data["runner_up"] = self.runner_up.to_dict() if self.runner_up else None
        data["candidates"] = [c.to_dict() for c in self.candidates]
        data["chosen"] = self.chosen.to_dict() if self.chosen else None
        data["plan"] = self.plan.to_dict() if self.plan else None
        data["placement"] = asdict(self.placement) if self.placement else None
        data["reasons"] = list(self.reasons)
        return data


def plan_model(entry: ModelEntry, cluster: Cluster | int, **options: Any) -> Plan:
    """The plan for `entry` on `cluster` (its free GPUs); PlanError when nothing fits.

    Options are `evaluate`'s. An int cluster is the old call, a GPU count: 0 means none.
    """
    if isinstance(cluster, int):
        cluster = Cluster((Node("local", "unknown", cluster),) if cluster > 0 else ())
    report = evaluate(entry, cluster, **options)
    if report.plan is None:
        raise PlanError(report.problem or f"no plan for {entry.name}", hint=report.hint)
    return report.plan


def evaluate(
    entry: ModelEntry,
    cluster: Cluster,
    *,
    context: int | None = None,
    concurrency: int | None = None,
    workload: Workload | None = None,
    precision: str | None = None,
    engine: str | None = None,
    replicas: int | None = None,
    kv_cache_dtype: str | None = None,
    objective: Objective | None = None,
    memory_fraction: float | Mapping[str, float] | None = None,
) -> PlanReport:
    """Decide how to serve `entry` on `cluster`.

    context: max_model_len (default: the model's, at most 128k, halved down to 4096 until it
    fits); concurrency: sequences of `context` tokens that must fit at once (default 1), and
    the batch of the throughput prediction (default: the most that fit, up to the engine's
    limit, that keep the objective's latency bounds); workload: mean input/output tokens for
    the prediction; precision, engine and kv_cache_dtype force one; replicas: how many
    (default: as many as the free GPUs hold, or as the objective's load needs); objective:
    how candidates are ranked (default Objective(): throughput with 20 tok/s per request
    and a 2 s TTFT); memory_fraction: engines.<engine>.gpu_memory_fraction, one value or
    one per engine name (default 0.9).
    """
    objective = objective or Objective()
    arch = entry.architecture
    if context is not None and not 1 <= context <= arch.max_context:
        raise PlanError(
            f"context {context} is outside 1-{arch.max_context}, what {entry.name} accepts"
        )
    if (concurrency is not None and concurrency < 1) or (replicas is not None and replicas < 1):
        raise PlanError("concurrency and replicas must be at least 1 when given")
    first_context = context or min(arch.max_context, DEFAULT_CONTEXT_CAP)
    head = PlanReport(
        entry.name, cluster.describe(), "vllm", first_context, concurrency, workload or Workload()
    )
    if entry.builtin or (cluster.total_gpus == 0 and on_cpu(entry)):
        plan = _cpu_plan(entry, context, concurrency, precision, engine, replicas, kv_cache_dtype)
        return replace(head, context=plan.max_model_len or 0, plan=plan)
    chosen_engine = _engine(entry, engine)
    if isinstance(memory_fraction, Mapping):
        memory_fraction = memory_fraction.get(chosen_engine)
    ask = _Ask(
        entry,
        chosen_engine,
        head.context,
        concurrency,
        head.workload,
        kv_cache_dtype,
        objective,
        memory_fraction,
    )
    head = replace(head, engine=ask.engine, objective=objective)
    precisions, refused = _precisions(entry, precision, objective)
    if cluster.total_gpus == 0:
        problem = f"{entry.name} needs GPUs and this cluster has none"
        return replace(head, problem=problem, hint=_gpu_hint(ask, precision))
    known = [gpu for gpu in cluster.gpu_types() if find_gpu(gpu)]
    if not known:
        problem = f"the planner has no figures for GPU type {', '.join(cluster.gpu_types())}"
        hint = f"The planner knows {known_gpus()}; `appliance plan --gpus` plans for one."
        return replace(head, problem=problem, hint=hint)
    contexts = [head.context] if context else _halvings(head.context)
    first: PlanReport | None = None
    for gpu in known:
        for ctx in contexts:
            report = _choose(
                replace(ask, context=ctx),
                GPUS[gpu],
                cluster.of_type(gpu),
                precisions,
                replicas,
                refused,
            )
            if report.plan is not None:
                return report
            first = first or report  # the longest context explains best what would fit
    assert first is not None
    return first


def on_cpu(entry: ModelEntry) -> bool:
    """`entry` can be served by vLLM's CPU build when a cluster has no GPUs."""
    return bool(entry.builtin) or (
        "vllm" in entry.engines
        and entry.architecture.params_total_b <= CPU_MAX_PARAMS_B
        and any(p in CPU_PRECISIONS for p in entry.precisions)
    )


def _cpu_plan(
    entry: ModelEntry,
    context: int | None,
    concurrency: int | None,
    precision: str | None,
    engine: str | None,
    replicas: int | None,
    kv_cache_dtype: str | None,
) -> Plan:
    """One replica of vLLM on the CPU: options it cannot honour are refused, not dropped."""
    why = (
        "is built locally and runs on the CPU"
        if entry.builtin
        else f"runs on the CPU here (no GPUs; {entry.architecture.params_total_b:g}B parameters)"
    )
    if engine not in (None, "vllm"):
        raise PlanError(
            f"{entry.name} {why} with vLLM's CPU build, not with {engine} (which needs GPUs)",
            hint="Leave out --engine (or pass --engine vllm).",
        )
    if replicas not in (None, 1):
        raise PlanError(
            f"{entry.name} gets one CPU replica; --replicas {replicas} cannot be honoured",
            hint="Leave out --replicas: a model on the CPU runs one replica.",
        )
    if kv_cache_dtype not in (None, "bf16"):
        raise PlanError(
            f"{entry.name} {why}: vLLM's CPU build keeps its KV cache in the model's dtype, "
            f"not {kv_cache_dtype}",
            hint="Leave out --kv-cache-dtype.",
        )
    usable = [p for p in entry.precisions if p in CPU_PRECISIONS]
    chosen = precision or (entry.default_precision if entry.default_precision in usable else None)
    chosen = chosen or (usable[0] if usable else entry.default_precision)
    if chosen not in usable:
        raise PlanError(
            f"{entry.name} {why}: vLLM's CPU build computes in "
            f"{', '.join(CPU_PRECISIONS)}, not {chosen}",
            hint=f"Leave out --precision (its CPU precisions: {', '.join(usable)}).",
        )
    arch = entry.architecture
    max_len = context or min(arch.max_context, CPU_CONTEXT)
    return Plan(
        "vllm",
        chosen,
        max_model_len=max_len,
        max_num_seqs=max(CPU_MAX_NUM_SEQS, concurrency or 0),
        explanation=f"{entry.name} {why}, with vLLM's CPU build: 1 replica, no GPUs, "
        f"{chosen}, context {max_len} tokens (--context raises it up to {arch.max_context}).",
    )


def _engine(entry: ModelEntry, engine: str | None) -> str:
    if engine is None:
        return entry.engines[0]
    if engine not in entry.engines:
        raise PlanError(
            f"{entry.name} is not served by engine '{engine}'",
            hint=f"Its catalog entry lists: {', '.join(entry.engines)}.",
        )
    return engine


def _precisions(
    entry: ModelEntry, forced: str | None, objective: Objective
) -> tuple[list[str], tuple[str, ...]]:
    """(the precisions to price, best first; why the catalog's others are not priced).

    `forced` (--precision) is the only one priced; otherwise every catalog precision that
    the objective's floor allows (`Objective.floor`)."""
    available: list[str] = [p for p in PRECISION_ORDER if p in entry.precisions]
    if forced is not None:
        if forced not in available:
            raise PlanError(
                f"{entry.name} has no {forced} weights in the catalog",
                hint=f"Available precisions: {', '.join(available)}.",
            )
        return [forced], ()
    floor = objective.floor(entry.default_precision)
    allowed = [p for p in available if objective.allows(p, entry.default_precision)]
    refused = tuple(
        f"{p}: lossier than {floor}, the lowest the objective allows (lowest={p} allows it)"
        for p in available
        if p not in allowed
    )
    return allowed, refused


def _halvings(start: int) -> list[int]:
    out = [start]
    while out[-1] // 2 >= MIN_AUTO_CONTEXT:
        out.append(out[-1] // 2)
    return out


@dataclass(frozen=True)
class Score:
    """A fitting candidate under the objective, with the replicas it would get."""

    candidate: Candidate
    replicas: int  # on this cluster: as many as fit, or as the load needs, or as asked
    total_tok_s: float  # output tokens/s of those replicas together
    enough: bool  # the replicas fit the cluster (min-gpus: and serve the load)

    @property
    def gpus(self) -> int:
        return self.replicas * self.candidate.gpus

    @property
    def per_gpu(self) -> float:
        return self.total_tok_s / max(self.gpus, 1)

    def describe(self) -> str:
        c, t = self.candidate, self.candidate.throughput
        assert t is not None
        return (
            f"{c.precision} {c.group} x {self.replicas} replica(s): {t.output_tok_s:,.0f} "
            f"output tok/s each at batch {t.batch} ({t.per_user_tok_s:,.0f} tok/s per "
            f"request, first token in {t.ttft_s:.2f} s), {self.total_tok_s:,.0f} in all "
            f"on {self.gpus} GPU(s)"
        )


def _score(ask: _Ask, c: Candidate, cluster: Cluster, replicas: int | None) -> Score:
    t = c.throughput
    assert t is not None
    room = len(place(cluster, c.tensor_parallel, c.pipeline_parallel, None).replicas)
    if ask.objective.kind == "min-gpus":
        needed = replicas or ask.objective.replicas_for(t.output_tok_s)
        enough = needed <= room and needed * t.output_tok_s >= ask.objective.load_tok_s
        return Score(c, needed, needed * t.output_tok_s, enough)
    count = replicas or room
    return Score(c, count, count * t.output_tok_s, 1 <= count <= room)


def _rank(ask: _Ask, scores: list[Score], order: list[str]) -> list[Score]:
    """Best first under the objective, precision one dimension among the others (a tie goes
    to the less lossy precision, then to fewer GPUs); candidates that miss the bounds last,
    fastest per user first."""

    def key(s: Score) -> tuple[float, ...]:
        c, t = s.candidate, s.candidate.throughput
        assert t is not None
        rank = order.index(c.precision)
        if not (c.meets and s.enough):
            return (1, -t.per_user_tok_s, rank, c.gpus)
        if ask.objective.kind == "min-gpus":
            return (0, s.gpus, -s.per_gpu, rank)
        return (0, -s.total_tok_s, rank, c.gpus)

    return sorted(scores, key=key)


def _lost(ask: _Ask, winner: Score, loser: Score) -> str:
    """Why `loser` is not the plan, in the objective's terms."""
    c, t = loser.candidate, loser.candidate.throughput
    assert t is not None
    if not c.meets:
        return (
            f"it misses the objective's bounds ({ask.objective.bounds()}): even one sequence "
            f"decodes at {t.per_user_tok_s:,.0f} tok/s with its first token in {t.ttft_s:.2f} s"
        )
    if not loser.enough:
        return f"the free GPUs do not hold the {loser.replicas} replica(s) it needs"
    if ask.objective.kind == "min-gpus" and loser.gpus != winner.gpus:
        return f"it needs {loser.gpus} GPU(s) for the load, not {winner.gpus}"
    if ask.objective.kind == "min-gpus" and loser.per_gpu < winner.per_gpu:
        less = 1 - loser.per_gpu / winner.per_gpu
        return f"as many GPUs, {less:.0%} fewer output tok/s per GPU ({loser.per_gpu:,.0f})"
    if loser.total_tok_s < winner.total_tok_s:
        less = 1 - loser.total_tok_s / winner.total_tok_s
        return f"{less:.0%} fewer output tok/s in all ({loser.total_tok_s:,.0f})"
    if c.precision != winner.candidate.precision:
        return f"as fast, and {winner.candidate.precision} is less lossy than {c.precision}"
    return f"it takes {c.gpus} GPU(s) per replica for the same output"


def _choose(
    ask: _Ask,
    gpu: GpuSpec,
    cluster: Cluster,
    precisions: list[str],
    replicas: int | None,
    refused: tuple[str, ...] = (),
) -> PlanReport:
    """Every precision x TP inside one node (PP across nodes only when none fits), ranked by
    the objective."""
    sizes = tensor_parallel_sizes(ask.entry.architecture, max(n.gpus for n in cluster.nodes))
    runnable = [p for p in precisions if gpu.supports(p)]
    candidates = [ask.candidate(gpu, p, tp) for p in runnable for tp in sizes]
    # trtllm-serve cannot put pipeline stages on other hosts (that needs an MPI launch).
    if not any(c.fits for c in candidates) and sizes and ask.engine != "trtllm":
        stages = sum(1 for node in cluster.nodes if node.gpus >= sizes[-1])
        for p in runnable:
            for pp in range(2, stages + 1):
                candidates.append(ask.candidate(gpu, p, sizes[-1], pp))
                if candidates[-1].fits:
                    break
            if candidates[-1].fits:
                break
    report = PlanReport(
        ask.entry.name,
        cluster.describe(),
        ask.engine,
        ask.context,
        ask.concurrency,
        ask.workload,
        tuple(candidates),
        objective=ask.objective,
    )
    reasons = [f"{p}: {gpu.key} cannot run it" for p in precisions if p not in runnable]
    reasons += refused
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        problem, hint = _nothing_fits(ask, gpu, cluster, runnable)
        return replace(report, problem=problem, hint=hint, reasons=tuple(reasons))
    ranked = _rank(ask, [_score(ask, c, cluster, replicas) for c in fitting], runnable)
    best = ranked[0]
    chosen = best.candidate
    for p in runnable:
        mine = [c for c in candidates if c.precision == p]
        if not any(c.fits for c in mine):
            biggest = max(mine, key=lambda c: c.gpus)
            reasons.append(f"{p}: {_short(biggest)} even on {biggest.gpus} GPU(s)")
    runner = ranked[1] if len(ranked) > 1 else None
    runner_up, lost, runner_text = None, None, None
    if runner is not None:
        runner_up, lost, runner_text = runner.candidate, _lost(ask, best, runner), runner.describe()
    elif len(candidates) > 1:  # the one that came closest to fitting
        runner_up = max((c for c in candidates if c is not chosen), key=lambda c: c.memory.free)
        lost = f"it does not fit {ask.context} tokens: {_short(runner_up)}"
        runner_text = f"{runner_up.precision} {runner_up.group}"
    # The best of every other precision, so the explanation shows what each would give.
    others = [
        next(s for s in ranked if s.candidate.precision == p)
        for p in dict.fromkeys(s.candidate.precision for s in ranked)
        if p != chosen.precision
    ]
    for other in others:
        if other is not runner:
            c = other.candidate
            reasons.append(
                f"{c.precision} at best {c.group} x {other.replicas}, "
                f"{other.total_tok_s:,.0f} output tok/s in all: {_lost(ask, best, other)}"
            )
    report = replace(
        report,
        chosen=chosen,
        reasons=tuple(reasons),
        runner_up=runner_up,
        lost_because=lost,
    )
    if ask.objective.kind == "min-gpus" and not (chosen.meets and best.enough):
        problem = (
            f"{ask.entry.name} cannot serve {ask.objective.load_tok_s:,.0f} output tok/s "
            f"on {cluster.describe()} ({ask.objective.bounds()}); the most is "
            f"{best.total_tok_s:,.0f} ({best.describe()})"
        )
        hint = (
            "Free or add GPUs, lower the load (--objective min-gpus,load=N), relax the bounds "
            "(user=, ttft=), or pass --objective throughput for the most these GPUs serve."
        )
        return replace(report, problem=problem, hint=hint)
    placement = place(cluster, chosen.tensor_parallel, chosen.pipeline_parallel, best.replicas)
    if not placement.replicas or (replicas and len(placement.replicas) < replicas):
        hint = "Free GPUs (remove a model) or ask for fewer replicas."
        return replace(report, placement=placement, problem=placement.explanation, hint=hint)
    plan = Plan(
        engine=ask.engine,
        precision=chosen.precision,
        replicas=len(placement.replicas),
        tensor_parallel=chosen.tensor_parallel,
        pipeline_parallel=chosen.pipeline_parallel,
        gpus_per_replica=chosen.gpus,
        max_model_len=ask.context,
        gpu=gpu.key,
        kv_cache_dtype=chosen.kv_cache_dtype,
        max_num_seqs=_max_num_seqs(ask, gpu, chosen),
        placement=placement.replicas,
        explanation=f"{_why(ask, best, runner_text, lost, runnable, reasons)} "
        f"{placement.explanation}",
    )
    return replace(report, plan=plan, placement=placement)


def _max_num_seqs(ask: _Ask, gpu: GpuSpec, chosen: Candidate) -> int:
    """The engine's limit, or the batch that keeps the objective's bounds when that is less
    (the engine then holds the rest back, so running requests stay within the bounds)."""
    limit = engine_limits(ask.engine, gpu, ask.memory_fraction).max_num_seqs
    if ask.concurrency:
        return max(limit, ask.concurrency)
    t = chosen.throughput
    if chosen.meets and t is not None and t.batch < chosen.max_batch:
        return t.batch
    return limit


def _why(
    ask: _Ask,
    best: Score,
    runner: str | None,
    lost: str | None,
    priced: list[str],
    reasons: list[str],
) -> str:
    c = best.candidate
    why = f"Objective: {ask.objective.describe()}. "
    if not c.meets:
        why += (
            f"No candidate meets those bounds at {ask.workload.input_tokens}:"
            f"{ask.workload.output_tokens} tokens; this one comes closest per request. "
        )
    why += f"{c.precision} {c.group} serves best of {', '.join(priced)} x TP: {best.describe()}."
    if runner is not None:
        why += f" Runner-up: {runner}; it lost: {lost}."
    if reasons:
        why += " Not chosen: " + "; ".join(reasons) + "."
    return why


def _short(c: Candidate) -> str:
    return f"{-c.memory.free / GIB:.1f} GiB per GPU short"


def _nothing_fits(
    ask: _Ask, gpu: GpuSpec, cluster: Cluster, runnable: list[str]
) -> tuple[str, str]:
    """What went wrong, and what would fit: more GPUs, a lower precision, a shorter context."""
    entry, where = ask.entry, cluster.describe()
    if not runnable:
        return (
            f"{gpu.key} cannot run any precision the catalog has for {entry.name}",
            f"{gpu.key} runs {', '.join(gpu.precisions)}; the catalog has "
            f"{', '.join(entry.precisions)}.",
        )
    best, arch = runnable[0], entry.architecture
    sizes = tensor_parallel_sizes(arch, max(n.gpus for n in cluster.nodes))
    stages = max(1, sum(1 for n in cluster.nodes if sizes and n.gpus >= sizes[-1]))

    def fits(p: str, tp: int, pp: int, context: int | None = None) -> bool:
        return ask.candidate(gpu, p, tp, pp, context).fits

    ideas = []
    node = tensor_parallel_sizes(arch, 8)  # nodes of 8 GPUs, the usual board
    more = next((f"{tp}x{gpu.key} (TP{tp})" for tp in node if fits(best, tp, 1)), None)
    pp = next((pp for pp in range(2, 17) if not more and node and fits(best, node[-1], pp)), 0)
    if pp:
        more = f"{pp}x8x{gpu.key} (TP{node[-1]} x PP{pp})"
    if more:
        ideas.append(f"more GPUs: {more} at {best}")
    rank = PRECISION_ORDER.index
    # --precision may have narrowed `runnable`: any lower precision in the catalog will do.
    lower = [p for p in entry.precisions if gpu.supports(p) and rank(p) > rank(best)]
    fitting = next((p for p in lower if sizes and fits(p, sizes[-1], stages)), None)
    if fitting:
        ideas.append(f"a lower precision: --precision {fitting} fits on {where}")
    for p in runnable if sizes else []:
        low, high = 0, ask.context - 1  # the longest context that fits, by bisection
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(p, sizes[-1], stages, mid) else (low, mid - 1)
        if low:
            ideas.append(f"a shorter context: --context {low} fits at {p}")
            break
    seqs = f"{ask.concurrency} sequences" if ask.concurrency else "one sequence"
    problem = (
        f"{entry.name} does not fit on {where} at {ask.context} tokens ({seqs}) in any of: "
        + ", ".join(runnable)
    )
    return problem, ("What would fit: " + "; ".join(ideas) + ".") if ideas else "Nothing close."


def _gpu_hint(ask: _Ask, precision: str | None) -> str:
    """Where a GPU model would go, for a cluster with no GPUs."""
    options = []
    for text in REFERENCE_CLUSTERS:
        report = evaluate(
            ask.entry,
            Cluster.parse(text),
            context=ask.context,
            concurrency=ask.concurrency,
            precision=precision,
            engine=ask.engine,
            replicas=1,
            kv_cache_dtype=ask.kv_dtype,
            memory_fraction=ask.memory_fraction,
        )
        if report.chosen:
            c = report.chosen
            options.append(f"{c.gpus}x{c.gpu} at {c.precision} ({c.group})")
    where = " or ".join(options) if options else "a larger GPU cluster"
    return (
        f"It would fit on {where}. Run it on GPU hosts, or compare the options with "
        f"`appliance plan {ask.entry.name} --gpus {REFERENCE_CLUSTERS[0]}`. Without GPUs, "
        f"catalog models of up to {CPU_MAX_PARAMS_B:g}B parameters run on the CPU."
    )
