"""TensorRT-LLM (`trtllm-serve`, PyTorch backend).

Flags follow trtllm-serve's `serve` command as read from TensorRT-LLM's source (tests
check each against that list). Quantization comes from the checkpoint (ModelOpt FP8/FP4
exports), not from a flag. Prometheus metrics (`trtllm_*` on /prometheus/metrics) exist
only when the engine's --config YAML turns on perf metrics, so the adapter writes one.
Multi-node TensorRT-LLM needs an MPI launch: plans that span hosts go to vLLM instead.
"""

from __future__ import annotations

from appliance.engines.base import EngineAdapter, EngineLaunch, LaunchSpec, warmup_request
from appliance.errors import EngineError

CONFIG_FILE = "trtllm-serve.yaml"

# The catalog names vLLM's parsers; trtllm-serve has its own, for fewer model families.
TOOL_PARSERS = {"hermes": "qwen3"}
REASONING_PARSERS = {"qwen3": "qwen3"}

# Read from tensorrt_llm/serve/openai_protocol.py (NVIDIA/TensorRT-LLM, main-branch
# snapshot 0076e939; released images may lack some): ChatCompletionRequest and
# CompletionRequest (extra="forbid", so anything else is the engine's 400 too). Withheld:
# priority, lora_request, disaggregated_params, conversation_params, agent_hierarchy,
# prompt_token_ids(_b64), injected_chat_template_kwargs (routing and server internals)
# and chat_template (a client's Jinja).
REQUEST_EXTENSIONS = frozenset(
    {
        "best_of", "use_beam_search", "top_k", "top_p_min", "min_p", "repetition_penalty",
        "length_penalty", "early_stopping", "stop_token_ids", "include_stop_str_in_output",
        "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
        "truncate_prompt_tokens", "thinking_token_budget", "prompt_ignore_length",
        "echo", "add_generation_prompt", "add_special_tokens", "documents",
        "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "cache_salt",
        "thinking", "response_format", "return_context_logits", "detokenize",
        "messages.reasoning", "messages.reasoning_content",
        "stream_options.continuous_usage_stats",
    }
)  # fmt: skip


class TrtllmEngine(EngineAdapter):
    name = "trtllm"
    request_extensions = REQUEST_EXTENSIONS
    metrics_path = "/prometheus/metrics"
    load_metrics = (
        "trtllm_num_requests_running",
        "trtllm_num_requests_waiting",
        "trtllm_kv_cache_utilization",
    )

    def launch(self, spec: LaunchSpec) -> EngineLaunch:
        plan, entry = spec.plan, spec.entry
        if plan.spans_nodes:
            raise EngineError(
                f"the plan for {spec.model} spans several hosts, which trtllm-serve cannot "
                "run without an MPI launcher",
                hint="Plan it for vLLM (`--engine vllm`), or on GPUs that fit one host.",
            )
        if entry.kind == "embedding":
            raise EngineError(
                f"{spec.model} is an embedding model; trtllm-serve serves it with another "
                "subcommand that the appliance does not drive",
                hint="Serve embedding models with vLLM.",
            )
        config_path = spec.work_dir / CONFIG_FILE
        argv = [
            "trtllm-serve",
            "serve",
            str(spec.weights),
            "--backend",
            "pytorch",
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--served_model_name",
            spec.model,
            "--tensor_parallel_size",
            str(plan.tensor_parallel),
            "--pipeline_parallel_size",
            str(plan.pipeline_parallel),
            # The spelling every trtllm-serve release accepts (newer ones alias it).
            "--kv_cache_free_gpu_memory_fraction",
            f"{self.settings.gpu_memory_fraction:.2f}",
            "--kv_cache_dtype",
            "fp8" if plan.kv_cache_dtype == "fp8" else "auto",
            "--log_level",
            "warning",
            "--config",
            str(config_path),
        ]
        if plan.max_model_len:
            argv += ["--max_seq_len", str(plan.max_model_len)]
        if plan.max_num_seqs:
            argv += ["--max_batch_size", str(plan.max_num_seqs)]
        if entry.tool_parser in TOOL_PARSERS:
            argv += ["--tool_parser", TOOL_PARSERS[entry.tool_parser]]
        if entry.reasoning_parser in REASONING_PARSERS:
            argv += ["--reasoning_parser", REASONING_PARSERS[entry.reasoning_parser]]
        argv += list(spec.extra_args)
        config = "\n".join(
            [
                "# Written by the appliance for this replica.",
                "return_perf_metrics: true  # mounts /prometheus/metrics",
                "enable_iter_perf_stats: true  # running/waiting and KV-cache gauges",
                "kv_cache_config:",
                "  enable_block_reuse: true  # prefix caching",
                "",
            ]
        )
        env = {"HF_HUB_OFFLINE": "1", "TRTLLM_NO_USAGE_STATS": "1", **spec.extra_env}
        return EngineLaunch(
            argv=argv,
            env=env,
            health_path="/health",
            engine_model=spec.model,
            warmup=warmup_request(spec, spec.model),
            files={CONFIG_FILE: config},
        )
