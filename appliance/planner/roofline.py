"""Throughput: what one replica serves, predicted from the GPU's peak figures.

A roofline per step of continuous batching. Each kernel group takes its memory time plus
its compute time (`roof`: a group is many kernels, some bound by one, some by the other),
and the groups run one after another:

    dense GEMMs    attention projections, shared experts, dense FFN layers, lm_head: weights
                   read once per step (a whole copy per GPU under attention data
                   parallelism), 2 FLOPs per parameter per token, what a quantized
                   checkpoint keeps in 16 bits (lm_head, some attention) at the 16-bit rate
    expert GEMMs   only the routed experts some token of the step is sent to:
                   E x (1 - (1 - k/E)^B) of each layer's E experts for B tokens, uniform
                   routing; 2 FLOPs per active expert parameter per token; under expert
                   parallelism the GPU with the most tokens sets the pace
    attention      every running sequence's KV cache read once (windows respected; Llama 4's
                   chunks not on TensorRT-LLM), QK^T and PV at the 16-bit rate
    communication  two all-reduces per layer (TP, and TP + EP), an all-gather and a
                   reduce-scatter per MoE layer (DP + EP), a network hop per pipeline stage

Prefill is compute-bound and shares the steps: a prompt's tokens add to the collectives'
volume, not to their fixed latency, which the step pays once. Five efficiency factors
(`Efficiency`) are fitted to published TensorRT-LLM results and checked on results not used
to fit them (appliance/planner/validation.py, docs/planning.md "Accuracy").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from appliance.catalog import Architecture, ModelEntry
from appliance.gpus import GpuSpec
from appliance.planner.layout import Layout
from appliance.planner.memory import (
    _CHECKPOINT_BYTES,
    GB,
    Params,
    kv_bytes,
    sixteen_bit_multiplied,
    weight_bytes,
)

# Per collective latency (NCCL on NVLink, small messages) and across nodes (InfiniBand).
_COLLECTIVE_S = 10e-6
_NETWORK_S = 30e-6
_NETWORK_GBS = 50.0  # 400 Gb/s NIC per GPU
_ACTIVATION_BYTES = 2  # hidden states travel in 16 bits


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks that serving reaches."""

    compute: float  # of dense Tensor Core FLOPS, for GEMMs and attention
    bandwidth: float  # of HBM bandwidth, for weight reads (GEMMs)
    attention: float  # of HBM bandwidth, for KV-cache reads (paged attention kernels)
    experts: float  # grouped expert GEMMs relative to dense GEMMs (both rooflines)
    link: float  # of NVLink (or PCIe) bandwidth, for the collectives of one step


# Fitted by `python -m appliance.planner.validation --fit` on the fit rows (the shapes in
# fit_shapes of appliance/planner/published.toml); tests/test_planner.py checks that a refit
# reproduces them.
FITTED = Efficiency(compute=0.549, bandwidth=1.000, attention=0.927, experts=0.309, link=0.890)


@dataclass(frozen=True)
class Workload:
    input_tokens: int = 1000
    output_tokens: int = 1000

    @classmethod
    def parse(cls, text: str) -> Workload:
        """'IN:OUT' mean tokens per request, e.g. '2048:256'."""
        try:
            inp, out = (int(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"'{text}' is not IN:OUT, e.g. 1000:1000") from None
        if inp < 1 or out < 1:
            raise ValueError(f"'{text}': input and output tokens must be at least 1")
        return cls(inp, out)


@dataclass(frozen=True)
class Throughput:
    batch: int  # concurrent sequences the prediction assumes
    prefill_tok_s: float  # input tokens/s of the whole group, compute-bound
    output_tok_s: float  # output tokens/s of the whole group, prefill included
    per_user_tok_s: float  # one request's output tokens/s while it decodes: output / batch
    ttft_s: float  # its prompt's prefill plus one decode step of the batch (no queueing)


def _attention_flops(arch: Architecture, tokens: int, context: int) -> float:
    """FLOPs of QK^T and PV for `tokens` new tokens at the end of `context` (causal)."""
    width = 4 * arch.num_attention_heads * arch.head_dim
    window = arch.sliding_window or 0
    full = arch.num_layers - arch.sliding_window_layers

    def seen(n: int, cap: int | None) -> float:  # sum over positions 1..n of keys attended
        if cap is None or n <= cap:
            return n * (n + 1) / 2
        if arch.window_kind == "chunked":
            return (n // cap) * cap * (cap + 1) / 2 + (n % cap) * (n % cap + 1) / 2
        return cap * (cap + 1) / 2 + (n - cap) * cap

    start = context - tokens
    total = full * (seen(context, None) - seen(start, None))
    if arch.sliding_window_layers:
        local = seen(context, window) - seen(start, window)
        total += arch.sliding_window_layers * local
    return width * total


def roof(memory: float, compute: float) -> float:
    """One kernel group's time: its memory-bound and compute-bound kernels (norms, casts,
    GEMMs of other shapes) run one after another, so their times add."""
    return memory + compute


def predict(
    entry: ModelEntry,
    gpu: GpuSpec,
    precision: str,
    kv_dtype: str,
    tp: int,
    pp: int,
    batch: int,
    workload: Workload,
    *,
    layout: Layout | None = None,
    efficiency: Efficiency = FITTED,
    engine: str | None = None,
) -> Throughput:
    """Steady-state throughput of one replica running `batch` sequences of `workload`.

    `layout` says how the tp x pp GPUs split the layers (default: plain TP x PP); under
    attention data parallelism `batch` is the whole group's, spread evenly over its GPUs.
    `engine` "trtllm": decode reads Llama 4's chunked layers whole (see `kv_bytes`).
    """
    arch, p, eff = entry.architecture, Params.of(entry.architecture), efficiency
    layout = layout or Layout(tp, pp)
    n, inp, out = tp * pp, workload.input_tokens, workload.output_tokens
    flops_rate = gpu.compute_tflops(precision) * 1e12 * n * eff.compute
    byte_rate = gpu.bandwidth_tbs * 1e12 * n * eff.bandwidth
    kv_rate = gpu.bandwidth_tbs * 1e12 * n * eff.attention
    # QK^T and PV multiply 16-bit queries and probabilities, whatever the weights' precision.
    attention_rate = gpu.compute_tflops("bf16") * 1e12 * n * eff.compute
    link = (gpu.link_gbs if tp <= gpu.nvlink_domain else gpu.pcie_gbs) * GB * eff.link

    # Parameters by role: routed experts (k of E per token) and everything else multiplied.
    e, k = arch.num_experts or 1, arch.experts_per_token or 1
    routed = p.experts * k / e  # routed expert parameters one token passes through
    dense = p.active - routed - p.lookup_only
    # Of `dense`, what stays 16-bit at a lower precision (lm_head; attention in some MoE
    # checkpoints) multiplies at the 16-bit rate.
    slow = sixteen_bit_multiplied(entry, precision)
    lm_head_16 = p.table if slow else 0.0

    def dense_compute(params: float, sixteen_bit: float, tokens: float) -> float:
        """2 FLOPs per parameter per token, the 16-bit weights at their own rate."""
        return 2 * tokens * ((params - sixteen_bit) / flops_rate + sixteen_bit / attention_rate)

    weights, expert_bytes = weight_bytes(entry, precision)
    dense_bytes = weights - expert_bytes - p.lookup_only * _CHECKPOINT_BYTES[arch.dtype]
    copies = tp if layout.attention_dp else 1  # GPUs that each read the dense weights whole

    def comm(tokens: float, latency: bool = True) -> float:
        """Collectives for `tokens` tokens in one forward pass, ring volumes over NVLink.
        `latency`: with each collective's fixed cost, which a step pays once however many
        tokens it carries (a prompt's tokens ride the collectives of the step they join)."""
        t, ring = 0.0, 2 * (tp - 1) / tp
        width = tokens * arch.hidden_size * _ACTIVATION_BYTES
        fixed, hop = (_COLLECTIVE_S, _NETWORK_S) if latency else (0.0, 0.0)
        if tp > 1 and layout.attention_dp:
            # Tokens gathered to every expert rank before each MoE layer and reduce-scattered
            # after it (both engines' default on Hopper); dense layers run locally.
            t += arch.routed_layers * (2 * fixed + ring * width / link)
        elif tp > 1:  # all-reduce after attention and after the FFN (EP: the same volume)
            t += 2 * arch.num_layers * (fixed + ring * width / link)
        if pp > 1:
            t += (pp - 1) * (hop + width / (_NETWORK_GBS * GB))
        return t

    def expert_compute(tokens: float, step_tokens: float) -> float:
        """Grouped expert GEMMs for `tokens` tokens of a step of `step_tokens`; under EP the
        busiest GPU sets the pace (uniform routing: a binomial share of the step's tokens x
        k assignments, its expected maximum over the tp GPUs about sqrt(2 ln tp) standard
        deviations above the mean)."""
        flops = 2 * routed * tokens / (flops_rate * eff.experts)
        if layout.experts == "ep" and tp > 1:
            spread = math.sqrt((tp - 1) / max(step_tokens * k, 1.0))
            flops *= 1 + math.sqrt(2 * math.log(tp)) * spread
        return flops

    # Prefill of one request: every input token through the multiplied weights, in a step
    # shared with the decoding batch (and, under attention DP, with a prompt on each rank).
    step_tokens = batch + inp * copies
    t_prefill = (
        dense_compute(dense - p.table, slow - lm_head_16, inp)
        + dense_compute(p.table, lm_head_16, 1)  # lm_head: the last token's logits
        + _attention_flops(arch, inp, inp) / attention_rate
        + expert_compute(inp, step_tokens)
        + comm(inp, latency=False)
    )

    # One decode step of `batch` sequences.
    t_dense = roof(dense_bytes * copies / byte_rate, dense_compute(dense, slow, batch))
    t_experts = 0.0
    if arch.is_moe:
        touched = 1 - (1 - k / e) ** batch
        expert_read = expert_bytes * touched / byte_rate / eff.experts
        t_experts = roof(expert_read, expert_compute(batch, batch))
    mean_context = inp + out // 2
    kv_read = batch * kv_bytes(
        entry, mean_context, kv_dtype, tp, engine=engine, attention_dp=layout.attention_dp
    )
    t_attention = roof(
        kv_read / kv_rate, batch * _attention_flops(arch, 1, mean_context) / attention_rate
    )
    t_step = t_dense + t_experts + t_attention + comm(batch)

    output = batch / (t_step + batch / out * t_prefill)
    # Under attention data parallelism one GPU of the tp prefills a prompt.
    ttft = t_prefill * copies + t_step
    return Throughput(batch, inp / t_prefill, output, output / batch, ttft)
