"""Candidates: one precision x TP x PP configuration priced against what a plan must satisfy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.catalog import Architecture, ModelEntry
from appliance.gpus import GpuSpec
from appliance.planner.layout import engine_layout
from appliance.planner.memory import (
    Memory,
    default_kv_dtype,
    engine_limits,
    kv_budget,
    kv_bytes,
    sequences_per_gpu_group,
)
from appliance.planner.objective import Objective
from appliance.planner.roofline import Throughput, Workload, predict


@dataclass(frozen=True)
class Candidate:
    """One precision x TP x PP configuration, per GPU figures in `memory`."""

    gpu: str
    precision: str
    kv_cache_dtype: str
    tensor_parallel: int
    pipeline_parallel: int
    context: int
    concurrency: int
    memory: Memory
    fits: bool
    max_seqs: int  # sequences of `context` tokens the KV cache holds, engine limit applied
    throughput: Throughput | None  # at the objective's batch; at batch 1 when it is missed
    note: str = ""
    layout: str = ""  # how the group splits the layers (appliance.planner.layout)
    meets: bool = False  # fits, and the objective's latency bounds hold at some batch
    max_batch: int = 0  # sequences of the workload the KV cache and the engine allow

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def group(self) -> str:
        pp = self.pipeline_parallel
        return f"TP{self.tensor_parallel}" + (f" x PP{pp}" if pp > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory_gib"] = self.memory.gib()
        del data["memory"]
        return data


@dataclass(frozen=True)
class _Ask:
    """What a plan must satisfy; `candidate` prices one configuration against it."""

    entry: ModelEntry
    engine: str
    context: int
    concurrency: int | None
    workload: Workload
    kv_dtype: str | None
    objective: Objective = field(default_factory=Objective)
    memory_fraction: float | None = None  # engines.<engine>.gpu_memory_fraction

    def candidate(
        self, gpu: GpuSpec, precision: str, tp: int, pp: int = 1, context: int | None = None
    ) -> Candidate:
        entry, n = self.entry, tp * pp
        limits = engine_limits(self.engine, gpu, self.memory_fraction)
        layout = engine_layout(self.engine, entry, tp, pp)
        context = context or self.context
        kv_dtype = self.kv_dtype or default_kv_dtype(entry, precision, gpu)
        weights, overhead, budget = kv_budget(entry, gpu, precision, layout, limits)
        per_seq = kv_bytes(entry, context, kv_dtype, tp, engine=self.engine) / n
        need = per_seq * (self.concurrency or 1)
        fits = budget > 0 and budget >= need
        max_seqs = min(int(budget // per_seq), limits.max_num_seqs) if budget > 0 else 0
        throughput, meets, most = None, False, 0
        if fits:
            w = self.workload

            def run(batch: int) -> Throughput:
                return predict(
                    entry,
                    gpu,
                    precision,
                    kv_dtype,
                    tp,
                    pp,
                    batch,
                    w,
                    layout=layout,
                    engine=self.engine,
                )

            if self.concurrency:
                throughput = run(self.concurrency)
                meets = self.objective.meets(throughput)
            else:
                # As many sequences of the workload as the KV cache holds, at most the
                # engine's limit; fewer when the objective's latency bounds need it.
                tokens = min(w.input_tokens + w.output_tokens, context)
                held = sequences_per_gpu_group(entry, tokens, kv_dtype, layout, budget, self.engine)
                most = max(1, min(int(held), limits.max_num_seqs))
                best = self.objective.best_batch(run, most)
                meets = best is not None
                throughput = best or run(1)
        note = ""
        if tp > gpu.nvlink_domain:
            note = f"{gpu.key} groups over {gpu.nvlink_domain} GPU(s) all-reduce over PCIe"
        memory = Memory(float(gpu.memory_bytes), weights, need, overhead, budget - need)
        return Candidate(
            gpu.key,
            precision,
            kv_dtype,
            tp,
            pp,
            context,
            self.concurrency or 1,
            memory,
            fits,
            max_seqs,
            throughput,
            note,
            layout.describe(),
            meets,
            most or self.concurrency or 0,
        )


def tensor_parallel_sizes(arch: Architecture, gpus_per_node: int) -> list[int]:
    """TP sizes engines accept: divide the attention heads, and divide the KV heads or be a
    multiple of them (vLLM and TRT-LLM replicate KV heads when TP exceeds them)."""
    return [
        tp
        for tp in range(1, gpus_per_node + 1)
        if arch.num_attention_heads % tp == 0
        and (arch.num_kv_heads % tp == 0 or tp % arch.num_kv_heads == 0)
    ]
