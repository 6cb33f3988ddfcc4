"""Memory: what weights, KV cache and the engine's runtime take on each GPU.

Memory, per GPU of a tensor-parallel (TP) x pipeline-parallel (PP) group:

    weights   each precision's bytes per parameter, scale overhead included; embeddings and
              lm_head stay 16-bit, and so does attention in quantized MoE checkpoints
    KV cache  2 x layers x KV heads x head_dim x KV dtype bytes per token, windowed layers
              capped at their window, x context x concurrency (KV heads replicated when TP
              exceeds them)
    overhead  CUDA context, NCCL buffers, CUDA graphs, peak activations and logits at the
              engine's batch limits, plus the headroom the engine leaves unused
    free      what the engine also gives to the KV cache: more or longer sequences
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from appliance.catalog import Architecture, HubSource, ModelEntry
from appliance.gpus import GpuSpec
from appliance.planner.layout import Layout

GB = 1e9
GIB = 2**30


# Bytes per parameter, scales included.
BYTES_PER_PARAM = {
    "fp32": 4.0,
    "bf16": 2.0,
    # FP8 E4M3 plus at most one FP32 scale per 128x128 block (Qwen's block-wise FP8; the
    # ModelOpt and compressed-tensors exports use per-tensor or per-channel scales: less).
    "fp8": 1.0 + 4 / (128 * 128),
    # NVFP4: E2M1 values plus one FP8 E4M3 scale per 16 values (NVIDIA, "Introducing NVFP4",
    # developer.nvidia.com blog, 2025; ModelOpt hf_quant_config group_size 16).
    "nvfp4": 0.5 + 1 / 16,
    # MXFP4: E2M1 values plus one E8M0 scale per 32 (OCP Microscaling Formats spec v1.0).
    "mxfp4": 0.5 + 1 / 32,
    # AWQ / GPTQ 4-bit, group size 128: one FP16 scale and one packed 4-bit zero per group.
    "int4-awq": 0.5 + 2.5 / 128,
    "int4-gptq": 0.5 + 2.5 / 128,
}
KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0}
_CHECKPOINT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}


@dataclass(frozen=True)
class Params:
    """Parameter counts by role, from the catalog's shapes and totals."""

    total: float
    active: float
    table: float  # vocab x hidden: the embedding matrix, and the lm_head matrix
    tied: bool  # lm_head is the embedding matrix
    attention: float
    experts: float  # all routed experts; 0 for dense models

    @classmethod
    def of(cls, arch: Architecture) -> Params:
        total, active = arch.params_total_b * 1e9, arch.params_active_b * 1e9
        table = float(arch.vocab_size * arch.hidden_size)
        heads = 2 * (arch.num_attention_heads + arch.num_kv_heads) * arch.head_dim
        attention = float(arch.num_layers * heads * arch.hidden_size)
        experts = 0.0
        if arch.num_experts and arch.experts_per_token:
            # total - active is exactly the (E - k) experts a token skips, in every MoE layer.
            e, k = arch.num_experts, arch.experts_per_token
            experts = (total - active) * e / (e - k)
        tied = arch.tie_word_embeddings
        tables = table * (1 if tied else 2)
        experts = max(0.0, min(experts, total - tables - attention))
        return cls(total, active, table, tied, attention, experts)

    @property
    def tables(self) -> float:
        """Embedding and lm_head parameters (one matrix when tied)."""
        return self.table * (1 if self.tied else 2)

    @property
    def lookup_only(self) -> float:
        """Parameters only looked up, never multiplied: an untied embedding matrix."""
        return 0.0 if self.tied else self.table


def weight_bytes(entry: ModelEntry, precision: str) -> tuple[float, float]:
    """(all weights, the routed experts among them) in bytes at `precision`.

    Embeddings and lm_head stay in the checkpoint's 16-bit dtype (ModelOpt excludes lm_head;
    AWQ/GPTQ never quantize either). In quantized MoE checkpoints attention stays 16-bit
    too, as in gpt-oss and Meta's Maverick FP8, except in NVIDIA's ModelOpt exports, which
    quantize every linear layer but lm_head and the router (vLLM's attention + FP8 output
    fusion tests run nvidia/Llama-4-Scout-17B-16E-Instruct-FP8's static FP8 o_proj). Vision
    towers are counted at the quantized size (the catalog has no separate count for them).
    """
    arch, p = entry.architecture, Params.of(entry.architecture)
    keep_bytes = _CHECKPOINT_BYTES[arch.dtype]
    per_param = BYTES_PER_PARAM[precision]
    if per_param >= keep_bytes:
        return p.total * per_param, p.experts * per_param
    kept = p.tables + _kept_attention(entry, precision)
    return kept * keep_bytes + (p.total - kept) * per_param, p.experts * per_param


def _kept_attention(entry: ModelEntry, precision: str) -> float:
    """Attention parameters a quantized MoE checkpoint leaves in 16 bits (see weight_bytes)."""
    arch = entry.architecture
    return Params.of(arch).attention if arch.is_moe and not modelopt(entry, precision) else 0.0


def sixteen_bit_multiplied(entry: ModelEntry, precision: str) -> float:
    """Parameters multiplied in 16 bits at a lower `precision`: lm_head, and attention where
    the checkpoint keeps it (weight_bytes); their GEMMs run at the 16-bit Tensor Core rate."""
    arch = entry.architecture
    if BYTES_PER_PARAM[precision] >= _CHECKPOINT_BYTES[arch.dtype]:
        return 0.0
    return Params.of(arch).table + _kept_attention(entry, precision)


def modelopt(entry: ModelEntry, precision: str) -> bool:
    """The `precision` weights are an NVIDIA ModelOpt export (an nvidia/ Hub repository)."""
    source = next((s for p, s in entry.sources.items() if p == precision), None)
    return isinstance(source, HubSource) and source.repo.startswith("nvidia/")


def default_kv_dtype(entry: ModelEntry, precision: str, gpu: GpuSpec | None) -> str:
    """What the engine's kv-cache-dtype "auto" resolves to for this checkpoint.

    NVIDIA's ModelOpt FP8/NVFP4 exports set kv_cache_quant_algo FP8 in hf_quant_config.json,
    which both engines honour; other checkpoints keep the KV cache in their 16-bit dtype.
    """
    fp8_ok = gpu is None or "fp8" in gpu.tflops
    if modelopt(entry, precision) and precision in ("fp8", "nvfp4") and fp8_ok:
        return "fp8"
    return "fp32" if entry.architecture.dtype == "float32" else "bf16"


@dataclass(frozen=True)
class EngineLimits:
    """An engine's memory rule and default batch limits on one GPU type."""

    name: str
    memory_fraction: float
    fraction_of_free: bool  # TRT-LLM: of memory left after weights; vLLM: of the whole GPU
    max_num_seqs: int
    max_num_batched_tokens: int


DEFAULT_MEMORY_FRACTION = 0.9  # engines.<name>.gpu_memory_fraction's default


def engine_limits(engine: str, gpu: GpuSpec, memory_fraction: float | None = None) -> EngineLimits:
    """`memory_fraction`: the configured engines.<engine>.gpu_memory_fraction (default 0.9),
    which the adapters pass as --gpu-memory-utilization / --kv_cache_free_gpu_memory_fraction."""
    fraction = DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"a GPU memory fraction is in (0, 1], not {fraction}")
    if engine == "trtllm":
        # trtllm-serve defaults: max_batch_size 2048, max_num_tokens 8192 (TorchLlmArgs;
        # ../shared/contracts/trtllm-serve.json).
        return EngineLimits("trtllm", fraction, True, 2048, 8192)
    # vLLM: gpu_memory_utilization 0.9; get_batch_defaults() in vllm/engine/arg_utils.py gives
    # the API server 1024 sequences / 8192 batched tokens on GPUs of 70 GiB or more except A100,
    # else 256 / 2048.
    big = gpu.memory_bytes >= 70 * GIB and not gpu.key.startswith("A100")
    return EngineLimits("vllm", fraction, False, 1024 if big else 256, 8192 if big else 2048)


# Runtime memory outside weights and KV, per GPU. CUDA context and allocator: ~0.5 GiB; NCCL
# communicator buffers when GPUs talk: ~0.5 GiB; CUDA graphs captured up to the batch limit:
# ~1 GiB (vLLM and TRT-LLM logs on H100 show 0.5-1.5 GiB).
_CONTEXT_BYTES = 0.5 * GIB
_NCCL_BYTES = 0.5 * GIB
_GRAPH_BYTES = 1.0 * GIB


def runtime_bytes(
    arch: Architecture, limits: EngineLimits, tp: int, pp: int, layout: Layout | None = None
) -> float:
    """Per-GPU memory the engine needs besides weights and KV cache (`layout`: how the tp
    GPUs split the experts; plain TP when not given)."""
    layout = layout or Layout(tp, pp)
    hidden, tokens = arch.hidden_size, limits.max_num_batched_tokens
    # Peak of one forward pass over max_num_batched_tokens: hidden states and QKV (16-bit),
    # the FFN's gate/up output, and fp32 logits + probabilities for max_num_seqs rows of the
    # vocabulary.
    activations = float(tokens * 4 * hidden * 2)
    if arch.is_moe:
        # The fused MoE sizes its workspace for k expert rows of every token it is given
        # (CutlassMoeFCRunner::getWorkspaceDeviceBufferSizes in TensorRT-LLM, vLLM's
        # intermediate caches alike): GEMM inputs, and GEMM outputs (the 16-bit gate/up
        # result or the down projection's), each buffer shared by both GEMMs. Under
        # attention data parallelism it is given every rank's tokens, gathered (their
        # input and output too), and the engine's memory profile runs max_num_batched_tokens
        # on every rank at once. Under expert parallelism each expert is whole on its GPU.
        k = arch.experts_per_token or 1
        ffn = (arch.moe_intermediate_size or arch.intermediate_size) / (
            1 if layout.experts == "ep" else tp
        )
        gathered = layout.attention_dp and tp > 1
        rows = tokens * (tp if gathered else 1)
        per_row = k * (2 * hidden + max(4 * ffn, 2 * hidden)) + (4 * hidden if gathered else 0)
        activations += rows * per_row
    else:
        activations += tokens * 2 * arch.intermediate_size / tp * 2
    logits = limits.max_num_seqs * arch.vocab_size * 4 * 2
    nccl = _NCCL_BYTES if tp * pp > 1 else 0.0
    return _CONTEXT_BYTES + nccl + _GRAPH_BYTES + activations + logits


def kv_budget(
    entry: ModelEntry, gpu: GpuSpec, precision: str, layout: Layout, limits: EngineLimits
) -> tuple[float, float, float]:
    """(weights, runtime + headroom, what is left for the KV cache), bytes per GPU."""
    weights = weights_per_gpu(entry, precision, layout)
    runtime = runtime_bytes(entry.architecture, limits, layout.tp, layout.pp, layout)
    total = float(gpu.memory_bytes)
    # vLLM leaves (1 - utilization) of the whole GPU; TRT-LLM of what weights leave free.
    headroom = (1 - limits.memory_fraction) * (
        max(total - weights - runtime, 0.0) if limits.fraction_of_free else total
    )
    return weights, runtime + headroom, total - headroom - weights - runtime


def sequences_per_gpu_group(
    entry: ModelEntry,
    tokens: int,
    kv_dtype: str,
    layout: Layout,
    budget: float,
    engine: str | None,
) -> float:
    """How many sequences of `tokens` the group's KV cache holds, `budget` bytes per GPU."""
    kv = kv_bytes(
        entry, tokens, kv_dtype, layout.tp, engine=engine, attention_dp=layout.attention_dp
    )
    if layout.attention_dp:  # each GPU holds whole sequences: its own
        return max(budget, 0.0) // (kv / layout.pp) * layout.tp
    return max(budget, 0.0) * layout.gpus / kv


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    total: float
    weights: float
    kv: float  # for `concurrency` sequences of `context` tokens
    overhead: float  # runtime + the headroom the engine leaves
    free: float  # left over (negative: does not fit)

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items()}


def kv_bytes(
    entry: ModelEntry,
    tokens: int,
    kv_dtype: str,
    tp: int,
    *,
    engine: str | None = None,
    attention_dp: bool = False,
) -> float:
    """KV cache of one sequence across the TP group (KV heads replicated when TP > heads;
    with attention data parallelism one GPU holds all the heads of its own sequences):
    what the engine stores, and what one decode step of the sequence reads.

    Chunked-attention layers (Llama 4) hold one chunk in vLLM, whose hybrid KV cache manager
    frees the blocks behind it (ChunkedLocalAttentionSpec in vllm/v1/kv_cache_interface.py),
    and the whole sequence in TensorRT-LLM, which sizes the cache for the longest window and
    applies the chunks to context requests only (docs/source/features/long-sequence.md:
    "chunked attention can only be applied to context requests"), so its decode reads them
    whole. Sliding windows are capped in both.
    """
    arch = entry.architecture
    replication = 1.0 if attention_dp else max(1.0, tp / arch.num_kv_heads)
    full = engine == "trtllm"
    return arch.kv_cache_bytes(tokens, KV_BYTES[kv_dtype], keep_chunked=full) * replication


def weights_per_gpu(entry: ModelEntry, precision: str, layout: Layout) -> float:
    """Weight bytes on each GPU: all split over the group, except that attention data
    parallelism keeps a whole copy of everything but the routed experts on every GPU."""
    weights, experts = weight_bytes(entry, precision)
    if layout.attention_dp:
        return (weights - experts + experts / layout.tp) / layout.pp
    return weights / layout.gpus


def memory_needed(
    entry: ModelEntry,
    gpu: GpuSpec,
    precision: str,
    *,
    context: int,
    concurrency: int = 1,
    tp: int = 1,
    pp: int = 1,
    engine: str = "vllm",
    kv_cache_dtype: str | None = None,
    memory_fraction: float | None = None,
) -> float:
    """Bytes of GPU memory over all tp x pp GPUs that `concurrency` sequences of `context`
    tokens need: weights, runtime, KV cache and the engine's headroom. A group fits exactly
    when this is at most the memory of its GPUs."""
    limits, n = engine_limits(engine, gpu, memory_fraction), tp * pp
    kv_dtype = kv_cache_dtype or default_kv_dtype(entry, precision, gpu)
    kv = kv_bytes(entry, context, kv_dtype, tp, engine=engine) * concurrency
    used = weight_bytes(entry, precision)[0] + n * runtime_bytes(entry.architecture, limits, tp, pp)
    if limits.fraction_of_free:
        return used + kv / limits.memory_fraction
    return (used + kv) / limits.memory_fraction
