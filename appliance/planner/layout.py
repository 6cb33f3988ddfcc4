"""Layouts: how one replica's GPUs split a model's layers between them.

TP        every layer's weights split over the group; KV heads too (replicated when the
          group outgrows them); two all-reduces per layer
TP + EP   attention split as in TP, each routed expert whole on one GPU (expert
          parallelism): what vLLM runs with --enable-expert-parallel
DP + EP   attention and the dense layers replicated, each GPU decoding its own sequences
          with its own KV cache (attention data parallelism); experts spread over the
          GPUs, tokens sent to them and back (two all-to-alls per MoE layer):
          TensorRT-LLM's enable_attention_dp with --ep, as NVIDIA benchmarks MoE models
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.catalog import ModelEntry


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    experts: Literal["tp", "ep"] = "tp"  # how the routed experts are split over the tp GPUs
    attention_dp: bool = False  # each of the tp GPUs runs attention for its own sequences

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        first = f"DP{self.tp}" if self.attention_dp else f"TP{self.tp}"
        ep = f" EP{self.tp}" if self.experts == "ep" and self.tp > 1 else ""
        return first + ep + (f" x PP{self.pp}" if self.pp > 1 else "")


def engine_layout(engine: str, entry: ModelEntry, tp: int, pp: int = 1) -> Layout:
    """The layout the appliance's engine adapters launch (appliance/engines/): vLLM gets
    --enable-expert-parallel for MoE models on more than one GPU; trtllm-serve gets only
    --tensor_parallel_size, so its experts are split like every other layer."""
    if engine == "vllm" and entry.architecture.is_moe and tp > 1:
        return Layout(tp, pp, experts="ep")
    return Layout(tp, pp)
