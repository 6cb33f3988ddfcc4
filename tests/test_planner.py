"""The planner: its memory model and roofline against published figures, and its choices."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from appliance.catalog import ModelEntry, load_catalog
from appliance.cli import plan as plan_cli
from appliance.gpus import GPUS
from appliance.placement import Cluster, Node
from appliance.planner import (
    BYTES_PER_PARAM,
    Plan,
    PlanError,
    Workload,
    default_kv_dtype,
    evaluate,
    kv_bytes,
    memory_needed,
    plan_model,
    predict,
    tensor_parallel_sizes,
    weight_bytes,
)

CATALOG = load_catalog()
RunPlan = Callable[..., Result]


def model(name: str) -> ModelEntry:
    return CATALOG.get(name)


# --- validation against published results ------------------------------------------------

# NVIDIA TensorRT-LLM, docs/source/performance/perf-overview.md ("Throughput Measurements",
# commit 00f37686 of NVIDIA/TensorRT-LLM): trtllm-bench, FP8 ModelOpt checkpoints
# (nvidia/Llama-3.1-8B-Instruct-FP8, nvidia/Llama-3.3-70B-Instruct-FP8), "Total Output
# Throughput (tokens/sec)" of the whole TP group, requests fed at an infinite rate.
# These are max-throughput runs, so the prediction runs as many sequences as the KV cache
# holds at ISL+OSL tokens, capped at TensorRT-LLM's max_batch_size (2048): concurrency=None.
REFERENCES = [
    # model, GPUs, input, output, published output tokens/s
    ("llama-3.1-8b-instruct", "1xH200", 128, 128, 27_911),  # table "Llama 3.1 8B", H200 TP1
    ("llama-3.1-8b-instruct", "1xH200", 2048, 2048, 12_194),  # same table
    ("llama-3.3-70b-instruct", "1xH200", 128, 128, 3_803),  # table "Llama 3.3 70B", H200 TP1
    ("llama-3.3-70b-instruct", "1xH200", 2048, 2048, 2_003),  # same table
    ("llama-3.3-70b-instruct", "2xH100-80GB", 128, 128, 6_378),  # same table, H100 TP2
    ("llama-3.3-70b-instruct", "2xH100-80GB", 2048, 2048, 3_082),  # same table
]


# Other rows of the same two tables, same checkpoints and GPUs; the efficiency factors were
# fitted on REFERENCES only, so these check the model out of sample.
MORE_SHAPES = [
    ("llama-3.1-8b-instruct", "1xH100-80GB", 128, 128, 28_312),
    ("llama-3.1-8b-instruct", "1xH100-80GB", 2048, 2048, 9_305),
    ("llama-3.1-8b-instruct", "1xH200", 1000, 1000, 17_744),
    ("llama-3.1-8b-instruct", "1xH200", 2048, 128, 3_538),
    ("llama-3.1-8b-instruct", "1xH200", 128, 2048, 26_221),
    ("llama-3.3-70b-instruct", "1xH200", 1000, 1000, 2_909),
    ("llama-3.3-70b-instruct", "1xH200", 2048, 128, 442),
    ("llama-3.3-70b-instruct", "1xH200", 128, 2048, 4_336),
    ("llama-3.3-70b-instruct", "2xH100-80GB", 1000, 1000, 4_205),
]


@pytest.mark.parametrize(
    ("name", "gpus", "isl", "osl", "published"),
    REFERENCES + MORE_SHAPES,
    ids=[f"{r[0]}-{r[1]}-{r[2]}/{r[3]}" for r in REFERENCES + MORE_SHAPES],
)
def test_throughput_matches_tensorrt_llm_within_30_percent(
    name: str, gpus: str, isl: int, osl: int, published: int
) -> None:
    report = evaluate(
        model(name),
        Cluster.parse(gpus),
        context=isl + osl,
        workload=Workload(isl, osl),
        precision="fp8",
        engine="trtllm",
        replicas=1,
    )
    # The configuration NVIDIA ran: TP over all the GPUs named (70B FP8 would squeeze onto
    # one H100 under TensorRT-LLM's memory rule, with room for only ~10 sequences).
    tp = Cluster.parse(gpus).total_gpus
    ran = next(c for c in report.candidates if c.tensor_parallel == tp and c.fits)
    assert ran.kv_cache_dtype == "fp8"  # ModelOpt checkpoints carry FP8 KV-cache scales
    assert ran.throughput is not None
    predicted = ran.throughput.output_tok_s
    assert predicted == pytest.approx(published, rel=0.30)


# Memory facts from issue 4 ("Planner, store and cost").


def test_llama_70b_bf16_does_not_fit_one_h100() -> None:
    report = evaluate(
        model("llama-3.3-70b-instruct"), Cluster.parse("1xH100-80GB"), precision="bf16"
    )
    assert report.plan is None
    assert report.hint is not None and "more GPUs" in report.hint


def test_llama_70b_bf16_fits_two_h200() -> None:
    plan = plan_model(model("llama-3.3-70b-instruct"), Cluster.parse("2xH200"), precision="bf16")
    assert (plan.precision, plan.tensor_parallel, plan.replicas) == ("bf16", 2, 1)
    assert plan.max_model_len == 131072  # and with the full 128k context


def test_a_70b_model_needs_about_168_gb_at_16_bit() -> None:
    # The rule of thumb: 70B x 2 bytes x 1.2 for runtime overhead = 168 GB.
    need = memory_needed(model("llama-3.3-70b-instruct"), GPUS["H100-80GB"], "bf16", context=4096)
    assert need / 1e9 == pytest.approx(168, rel=0.05)


# --- the memory model ------------------------------------------------------------------


def test_scale_overhead_per_precision() -> None:
    assert BYTES_PER_PARAM["nvfp4"] == 0.5 + 1 / 16  # one FP8 scale per 16 values
    assert BYTES_PER_PARAM["mxfp4"] == 0.5 + 1 / 32  # one E8M0 scale per 32
    assert BYTES_PER_PARAM["int4-awq"] == pytest.approx(0.5195, abs=1e-4)  # group 128
    assert 1.0 < BYTES_PER_PARAM["fp8"] < 1.001


def test_weights_match_published_checkpoints() -> None:
    # openai/gpt-oss-120b and -20b on the Hub: MXFP4 experts, BF16 elsewhere; the model card
    # says 120b fits one 80 GB GPU and 20b runs within 16 GB. Their safetensors total about
    # 65 GB and 13.8 GB.
    assert weight_bytes(model("gpt-oss-120b"), "mxfp4")[0] / 1e9 == pytest.approx(65, rel=0.05)
    assert weight_bytes(model("gpt-oss-20b"), "mxfp4")[0] / 1e9 == pytest.approx(13.8, rel=0.05)
    # Llama 3.1 8B: 8.03B x 2 bytes; FP8 keeps embeddings and lm_head (2 x 0.525B) in BF16.
    entry = model("llama-3.1-8b-instruct")
    assert weight_bytes(entry, "bf16")[0] == pytest.approx(16.06e9)
    assert weight_bytes(entry, "fp8")[0] / 1e9 == pytest.approx(9.08, rel=0.01)


def test_kv_cache_per_token_and_windows() -> None:
    llama70 = model("llama-3.3-70b-instruct")
    # 2 x 80 layers x 8 KV heads x 128 x 2 bytes.
    assert kv_bytes(llama70, 1, "bf16", tp=1) == 2 * 80 * 8 * 128 * 2
    assert kv_bytes(llama70, 1, "fp8", tp=1) == 2 * 80 * 8 * 128
    scout = model("llama-4-scout")
    per_layer = 2 * 8 * 128 * 2
    # 12 global layers see 131072 tokens, 36 chunked layers at most 8192.
    assert kv_bytes(scout, 131072, "bf16", tp=1) == per_layer * (12 * 131072 + 36 * 8192)


def test_kv_heads_are_replicated_when_tp_exceeds_them() -> None:
    qwen = model("qwen3-235b-a22b")  # 4 KV heads
    assert kv_bytes(qwen, 100, "bf16", tp=8) == 2 * kv_bytes(qwen, 100, "bf16", tp=4)


def test_kv_dtype_follows_the_checkpoint() -> None:
    h100 = GPUS["H100-80GB"]
    # nvidia/ ModelOpt exports set kv_cache_quant_algo FP8; others keep BF16.
    assert default_kv_dtype(model("llama-3.3-70b-instruct"), "fp8", h100) == "fp8"
    assert default_kv_dtype(model("llama-3.3-70b-instruct"), "bf16", h100) == "bf16"
    assert default_kv_dtype(model("qwen3-32b"), "fp8", h100) == "bf16"  # Qwen's own FP8


def test_memory_needed_agrees_with_fits() -> None:
    entry, h200 = model("llama-3.3-70b-instruct"), GPUS["H200"]
    for engine in ("vllm", "trtllm"):
        for tp in (1, 2):
            report = evaluate(
                entry,
                Cluster.parse(f"{tp}xH200"),
                precision="bf16",
                engine=engine,
                context=65536,
                concurrency=2,
            )
            fits = any(c.fits for c in report.candidates if c.tensor_parallel == tp)
            need = memory_needed(
                entry, h200, "bf16", context=65536, concurrency=2, tp=tp, engine=engine
            )
            assert fits == (need <= tp * h200.memory_bytes)


def test_tensor_parallel_sizes_divide_the_heads() -> None:
    scout = model("llama-4-scout").architecture  # 40 heads, 8 KV heads: not 5
    assert tensor_parallel_sizes(scout, 8) == [1, 2, 4, 8]
    qwen = model("qwen3-235b-a22b").architecture  # 4 KV heads: 8 replicates them
    assert tensor_parallel_sizes(qwen, 8) == [1, 2, 4, 8]
    assert tensor_parallel_sizes(scout, 3) == [1, 2]


def test_moe_decode_reads_more_experts_as_the_batch_grows() -> None:
    entry, h200 = model("qwen3-235b-a22b"), GPUS["H200"]
    one = predict(entry, h200, "fp8", "bf16", 8, 1, 1, Workload(128, 128))
    many = predict(entry, h200, "fp8", "bf16", 8, 1, 64, Workload(128, 128))
    # More sequences share each step, but the step reads more experts: not 64x faster.
    assert one.output_tok_s < many.output_tok_s < 64 * one.output_tok_s
    assert many.per_user_tok_s < one.per_user_tok_s


# --- choices ---------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", ["8xH100-80GB", "8xH200"])
@pytest.mark.parametrize("name", CATALOG.names())
def test_every_catalog_model_has_a_plan_on_h100_and_h200_nodes(name: str, gpus: str) -> None:
    plan = plan_model(model(name), Cluster.parse(gpus))
    assert plan.replicas >= 1
    if not plan.on_cpu:
        assert plan.gpu == gpus.split("x")[1]
        assert plan.replicas * plan.gpus_per_replica <= 8
        assert plan.explanation


def test_best_precision_first_then_smallest_tp() -> None:
    entry = model("llama-3.3-70b-instruct")
    plan = plan_model(entry, Cluster.parse("8xH100-80GB"))
    assert (plan.precision, plan.tensor_parallel, plan.replicas) == ("bf16", 4, 2)
    plan = plan_model(entry, Cluster.parse("8xH100-80GB"), precision="fp8")
    assert (plan.precision, plan.tensor_parallel, plan.replicas) == ("fp8", 2, 4)


def test_lower_precision_when_16_bit_does_not_fit_a_node() -> None:
    plan = plan_model(model("llama-3.1-405b-instruct"), Cluster.parse("8xH100-80GB"))
    assert (plan.precision, plan.tensor_parallel, plan.pipeline_parallel) == ("fp8", 8, 1)


def test_pipeline_parallel_only_across_nodes_when_one_node_cannot_hold_it() -> None:
    entry = model("llama-3.1-405b-instruct")
    plan = plan_model(entry, Cluster.parse("2x8xH100-80GB"), precision="bf16")
    assert (plan.tensor_parallel, plan.pipeline_parallel, plan.gpus_per_replica) == (8, 2, 16)
    assert plan.placement == (("node-0", "node-1"),)
    # With a precision that fits one node, replicas stay inside nodes.
    plan = plan_model(entry, Cluster.parse("2x8xH100-80GB"))
    assert (plan.precision, plan.pipeline_parallel, plan.replicas) == ("fp8", 1, 2)


def test_nothing_fits_says_what_would() -> None:
    entry = model("llama-3.1-405b-instruct")
    with pytest.raises(PlanError) as err:
        plan_model(entry, Cluster.parse("8xH100-80GB"), precision="bf16")
    assert "does not fit on 8xH100-80GB" in err.value.message
    assert "2x8xH100-80GB (TP8 x PP2)" in str(err.value.hint)
    assert "--precision fp8" in str(err.value.hint)
    with pytest.raises(PlanError) as err:
        plan_model(entry, Cluster.parse("8xH100-80GB"), context=131072, concurrency=4)
    assert "a shorter context: --context" in str(err.value.hint)


def test_context_shrinks_to_fit_unless_given() -> None:
    entry = model("llama-3.1-405b-instruct")
    plan = plan_model(entry, Cluster.parse("8xH100-80GB"), concurrency=4)
    assert plan.max_model_len == 65536
    scout = plan_model(model("llama-4-scout"), Cluster.parse("8xH200"))
    assert scout.max_model_len == 131072  # the 10M-token model is served at 128k by default


def test_gpus_the_gpu_cannot_run_are_skipped() -> None:
    entry = model("llama-3.1-8b-instruct")
    with pytest.raises(PlanError, match="H100-80GB cannot run any precision"):
        plan_model(entry, Cluster.parse("8xH100-80GB"), precision="nvfp4")
    assert plan_model(entry, Cluster.parse("1xB200"), precision="nvfp4").precision == "nvfp4"


def test_builtin_models_get_a_vllm_cpu_plan_anywhere() -> None:
    tiny = model("tiny-random-llama")
    for cluster in (Cluster.cpu_only(), Cluster.parse("8xH200")):
        plan = plan_model(tiny, cluster)
        assert (plan.engine, plan.gpus_per_replica, plan.replicas) == ("vllm", 0, 1)
        assert plan.on_cpu and plan.gpu is None and plan.placement == ()
        assert (plan.max_model_len, plan.max_num_seqs) == (2048, 8)
        assert "vLLM's CPU build" in plan.explanation
    # More concurrency asked for than the default: the engine admits that many.
    assert plan_model(tiny, Cluster.cpu_only(), concurrency=16).max_num_seqs == 16
    assert plan_model(tiny, Cluster.cpu_only(), context=512).max_model_len == 512


def test_cpu_plans_refuse_the_options_they_cannot_honour() -> None:
    tiny = model("tiny-random-llama")
    for cluster in (Cluster.cpu_only(), Cluster.parse("8xH200")):
        with pytest.raises(PlanError, match=r"runs on the CPU .* not with trtllm") as err:
            plan_model(tiny, cluster, engine="trtllm")
        assert err.value.hint == "Leave out --engine (or pass --engine vllm)."
        with pytest.raises(PlanError, match="--replicas 2 cannot be honoured"):
            plan_model(tiny, cluster, replicas=2)
        assert plan_model(tiny, cluster, engine="vllm", replicas=1).on_cpu


def test_gpu_models_without_gpus_say_where_they_would_fit() -> None:
    with pytest.raises(PlanError) as err:
        plan_model(model("llama-4-scout"), Cluster.cpu_only())
    assert err.value.message == "llama-4-scout needs GPUs and this cluster has none"
    assert "4xH100-80GB at bf16 (TP4)" in str(err.value.hint)


def test_the_old_gpu_count_call_still_works() -> None:
    assert plan_model(model("tiny-random-llama"), 0).on_cpu
    with pytest.raises(PlanError, match="needs GPUs"):
        plan_model(model("llama-4-scout"), 0)
    with pytest.raises(PlanError, match="no figures for GPU type unknown"):
        plan_model(model("llama-4-scout"), 8)


def test_requests_the_catalog_cannot_serve_are_refused() -> None:
    entry, cluster = model("mistral-small-3.1-24b-instruct"), Cluster.parse("8xH200")
    with pytest.raises(PlanError, match="not served by engine 'trtllm'"):
        plan_model(entry, cluster, engine="trtllm")
    with pytest.raises(PlanError, match="no int4-awq weights"):
        plan_model(entry, cluster, precision="int4-awq")
    with pytest.raises(PlanError, match="outside 1-131072"):
        plan_model(entry, cluster, context=200_000)


def test_replicas_can_be_limited_and_must_fit() -> None:
    entry = model("llama-3.1-8b-instruct")
    assert plan_model(entry, Cluster.parse("8xH200"), replicas=2).replicas == 2
    busy = Cluster((Node("node-0", "H200", 1),))
    with pytest.raises(PlanError, match="Only 1 of the 2 replicas"):
        plan_model(entry, busy, replicas=2)


def test_the_next_model_is_planned_on_what_is_left() -> None:
    cluster = Cluster.parse("2x8xH200")
    first = plan_model(model("llama-3.3-70b-instruct"), cluster, replicas=3)
    assert first.gpus_per_node() == {"node-0": 4, "node-1": 2}
    left = cluster.without(first.gpus_per_node())
    assert left.describe() == "4xH200+6xH200"
    second = plan_model(model("llama-3.1-405b-instruct"), left)
    assert (second.precision, second.tensor_parallel, second.replicas) == ("fp8", 4, 2)
    # At bf16 no node has room left: TP4 on each of two nodes, pipelined.
    third = plan_model(model("llama-3.1-405b-instruct"), left, precision="bf16")
    assert (third.tensor_parallel, third.pipeline_parallel) == (4, 2)
    assert third.placement == (("node-0", "node-1"),)


def test_plans_round_trip_through_json() -> None:
    plan = plan_model(model("llama-3.3-70b-instruct"), Cluster.parse("2x8xH200"))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # Rows written before the GPU planner still load.
    old = {
        "engine": "cpu",
        "precision": "fp32",
        "replicas": 1,
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "gpus_per_replica": 0,
        "cpus_per_replica": 1.0,
        "max_model_len": 2048,
    }
    assert Plan.from_dict(old).gpu is None


# --- appliance plan --------------------------------------------------------------------


@pytest.fixture
def run_plan(appliance_home: Path, monkeypatch: pytest.MonkeyPatch) -> RunPlan:
    monkeypatch.setattr("appliance.config.SEARCH_PATHS", (Path("appliance.toml"),))
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = {"config_path": None}

    app.command("plan")(plan_cli.plan)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["plan", *args])


def test_plan_command_shows_candidates_and_the_plan(run_plan: RunPlan) -> None:
    result = run_plan("llama-4-scout", "--gpus", "8xH100-80GB")
    assert result.exit_code == 0, result.output
    assert "weights" in result.output and "output tok/s" in result.output
    assert "Plan: vllm, bf16" in result.output
    assert "TP4, 2 replica(s) of 4 H100-80GB" in result.output


def test_plan_command_json(run_plan: RunPlan) -> None:
    result = run_plan(
        "llama-3.1-8b-instruct",
        "--gpus",
        "1xH200",
        "--workload",
        "128:128",
        "--precision",
        "fp8",
        "--engine",
        "trtllm",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["plan"]["precision"] == "fp8"
    assert data["chosen"]["memory_gib"]["weights"] > 8
    assert data["chosen"]["throughput"]["output_tok_s"] > 0


def test_plan_command_rejects_bad_input_as_usage_errors(run_plan: RunPlan) -> None:
    assert run_plan("llama-4-scout", "--gpus", "8xH300").exit_code == 2
    assert run_plan("llama-4-scout", "--workload", "a:b", "--gpus", "cpu").exit_code == 2


def test_plan_command_reports_what_does_not_fit(run_plan: RunPlan) -> None:
    result = run_plan("llama-4-scout", "--gpus", "cpu")
    assert isinstance(result.exception, PlanError)
    assert "needs GPUs" in result.exception.message
