"""Deployment plans: which engine, precision, GPUs and placement a model gets.

`plan_model(entry, cluster, **options)` answers with a `Plan`; `evaluate` returns the whole
reasoning (every candidate with its memory breakdown and predicted throughput) for
`appliance plan`. docs/planning.md explains the rules and how accurate the predictions are.

    plan        Plan (nothing fits: appliance.errors.PlanError)
    memory      bytes per GPU: weights, KV cache, the engine's runtime and headroom
    roofline    predicted throughput of one TP x PP group (Workload, predict)
    candidates  one precision x TP x PP configuration priced against the ask
    layout      how a replica's GPUs split the layers: TP, TP + EP, DP + EP
    objective   what "best" means: throughput under latency bounds, or fewest GPUs for a load
    choose      evaluate and plan_model: the best candidate under the objective, and why
    validation  the roofline against published results: fit rows, held-out rows, errors
"""

from appliance.planner.candidates import Candidate, tensor_parallel_sizes
from appliance.planner.choose import (
    DEFAULT_CONTEXT_CAP,
    MIN_AUTO_CONTEXT,
    REFERENCE_CLUSTERS,
    PlanReport,
    evaluate,
    plan_model,
)
from appliance.planner.layout import Layout, engine_layout
from appliance.planner.memory import (
    BYTES_PER_PARAM,
    GB,
    GIB,
    KV_BYTES,
    EngineLimits,
    Memory,
    Params,
    default_kv_dtype,
    engine_limits,
    kv_bytes,
    memory_needed,
    runtime_bytes,
    weight_bytes,
)
from appliance.planner.objective import Objective
from appliance.planner.plan import Plan
from appliance.planner.roofline import FITTED, Efficiency, Throughput, Workload, predict

__all__ = [
    "BYTES_PER_PARAM",
    "DEFAULT_CONTEXT_CAP",
    "FITTED",
    "GB",
    "GIB",
    "KV_BYTES",
    "MIN_AUTO_CONTEXT",
    "REFERENCE_CLUSTERS",
    "Candidate",
    "Efficiency",
    "EngineLimits",
    "Layout",
    "Memory",
    "Objective",
    "Params",
    "Plan",
    "PlanReport",
    "Throughput",
    "Workload",
    "default_kv_dtype",
    "engine_layout",
    "engine_limits",
    "evaluate",
    "kv_bytes",
    "memory_needed",
    "plan_model",
    "predict",
    "runtime_bytes",
    "tensor_parallel_sizes",
    "weight_bytes",
]
