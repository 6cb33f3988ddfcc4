"""The planner: its memory model and roofline against published figures, and its choices."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from appliance.catalog import HubSource, ModelEntry, load_catalog
from appliance.cli import plan as plan_cli
from appliance.errors import PlanError
from appliance.gpus import GPUS
from appliance.placement import Cluster, Node
from appliance.planner import (
    BYTES_PER_PARAM,
    FITTED,
    Candidate,
    Objective,
    Plan,
    Workload,
    default_kv_dtype,
    evaluate,
    kv_bytes,
    memory_needed,
    plan_model,
    predict,
    tensor_parallel_sizes,
    validation,
    weight_bytes,
)
from appliance.planner.layout import Layout
from appliance.planner.memory import GIB, EngineLimits, runtime_bytes, sixteen_bit_multiplied

CATALOG = load_catalog()
RunPlan = Callable[..., Result]


def model(name: str) -> ModelEntry:
    return CATALOG.get(name)


# --- validation against published results ------------------------------------------------

# appliance/planner/published.toml holds every H100/H200 FP8 row of TensorRT-LLM's perf
# overview; the five efficiency factors were fitted on the rows of four sequence shapes and
# the errors below are computed here, from that file and the model, on the others.
RESULTS = validation.results()
HELD_OUT = [r for r in RESULTS if not r.row.fit]
TARGET_MEDIAN, TARGET_WORST = 0.10, 0.25  # issue 16: every held-out row within 25%


def test_fit_and_held_out_rows_are_disjoint_and_cover_dense_moe_and_shapes() -> None:
    fit = {(r.model, r.gpus, r.shape) for r in validation.ROWS if r.fit}
    held = {(r.row.model, r.row.gpus, r.row.shape) for r in HELD_OUT}
    assert fit and held and not fit & held
    assert len(fit) + len(held) == len(validation.ROWS) == 112
    assert len({r.row.shape for r in HELD_OUT}) >= 3
    assert any(r.moe for r in HELD_OUT) and any(not r.moe for r in HELD_OUT)


def test_the_rows_are_the_published_file() -> None:
    published = validation.load()
    assert published.source.commit == "00f37686aa854010d68bcbd0f4ab000221541ca6"
    scout = next(t for t in published.tables if t.gpus == "4xH200")
    assert scout.model == "llama-4-scout" and scout.output_tok_s["128/128"] == 30354
    assert sum(len(t.output_tok_s) for t in published.tables) == len(validation.ROWS)


def test_the_shipped_factors_are_what_the_fit_rows_give() -> None:
    # Refitting on the fit rows alone reproduces roofline.FITTED: the factors were not
    # adjusted by hand, or to the held-out rows.
    refit = validation.fit()
    for name in ("compute", "bandwidth", "attention", "experts", "link"):
        assert getattr(refit, name) == pytest.approx(getattr(FITTED, name), abs=0.01), name


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_held_out_median_error_is_within_the_target(moe: bool) -> None:
    assert validation.summary(r for r in HELD_OUT if r.moe == moe).median <= TARGET_MEDIAN
    assert validation.summary(HELD_OUT).median <= TARGET_MEDIAN


def test_every_held_out_row_is_within_the_target_or_named_with_its_reason() -> None:
    # The rows the model misses are listed in the data file with the reason, and the list
    # cannot go stale: a listed row that came within the target fails too.
    listed = {(m.model, m.gpus, m.shape): m.reason for m in validation.PUBLISHED.outside_target}
    for r in HELD_OUT:
        key = (r.row.model, r.row.gpus, r.row.shape)
        outside = abs(r.error) > TARGET_WORST
        assert outside == (key in listed), f"{key}: {r.error:+.0%}"
    assert all(len(reason) > 40 for reason in listed.values())
    assert len(listed) <= 1  # one of 67 today: docs/planning.md "Accuracy"


def test_validation_table_prints_every_row() -> None:
    text = validation.table(RESULTS)
    assert text.count("| held out |") == len(HELD_OUT)
    assert "held out, MoE" in text and "held out, dense" in text


def test_the_docs_show_the_table_the_model_gives() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "planning.md").read_text()
    assert validation.table(RESULTS) in docs


def test_trtllm_bench_settings_follow_its_tuning() -> None:
    # tensorrt_llm/bench/build/tuning.py: KV-cache requests capped at 4096, rounded up.
    entry, h200 = model("llama-3.1-8b-instruct"), GPUS["H200"]
    assert validation.bench_settings(entry, h200, 1, 128, 128) == (4096, 8192)
    bs, tokens = validation.bench_settings(entry, h200, 1, 20000, 2000)
    assert bs % 32 == 0 and 64 <= bs < 256
    # Chunked prefill off (trtllm-bench's default): a whole prompt and the batch's
    # generation tokens fit one step, whatever the tuning gave.
    assert tokens == 20000 + bs


def test_each_run_has_the_kv_cache_its_checkpoint_asks_for() -> None:
    # trtllm-bench's kv_cache_dtype "auto" keeps the checkpoint's kv_cache_quant_algo:
    # nvidia/Llama-3.1-405B-Instruct-FP8 sets none, so its runs held a 16-bit cache.
    kv = {t.checkpoint: t.kv_dtype for t in validation.PUBLISHED.tables}
    assert kv["nvidia/Llama-3.1-405B-Instruct-FP8"] == "bf16"
    assert kv["nvidia/Llama-3.1-8B-Instruct-FP8"] == "fp8"
    rows = [r for r in RESULTS if r.row.model == "llama-3.1-405b-instruct"]
    assert rows and all(r.row.kv_dtype == "bf16" for r in rows)
    # The 16-bit cache halves the requests trtllm-bench's tuning sizes the batch for.
    entry, h100 = model("llama-3.1-405b-instruct"), GPUS["H100-80GB"]
    fp8 = validation.bench_settings(entry, h100, 8, 1000, 1000, "fp8")[0]
    bf16 = validation.bench_settings(entry, h100, 8, 1000, 1000, "bf16")[0]
    assert bf16 < fp8 <= 2 * bf16


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


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("llama-3.1-405b-instruct", Layout(8)),
        ("qwen3-235b-a22b", Layout(8, 1, "ep", attention_dp=True)),
    ],
)
def test_a_short_prompt_is_not_charged_a_steps_collective_latency(
    name: str, layout: Layout
) -> None:
    # A prompt's tokens ride the collectives of the step they join, so its prefill rate does
    # not fall for short prompts (the all-reduces' fixed cost is the step's, paid once).
    entry, h200 = model(name), GPUS["H200"]

    def rate(isl: int) -> float:
        shape = Workload(isl, 128)
        return predict(entry, h200, "fp8", "fp8", 8, 1, 256, shape, layout=layout).prefill_tok_s

    assert rate(128) >= 0.98 * rate(1024)


def test_the_moe_workspace_is_sized_for_the_gathered_tokens() -> None:
    qwen = model("qwen3-235b-a22b").architecture
    limits = EngineLimits("trtllm", 0.95, True, 224, 20224)  # trtllm-bench's, 20000/2000

    def runtime(tp: int, attention_dp: bool) -> float:
        return runtime_bytes(qwen, limits, tp, 1, Layout(tp, 1, "ep", attention_dp))

    # Under attention DP every rank's tokens reach the MoE: its workspace grows with the
    # group; under TP + EP each GPU sees its own batch only.
    assert runtime(8, True) - runtime(4, True) > 10 * GIB
    assert runtime(8, False) == pytest.approx(runtime(4, False))
    # CutlassMoeFCRunner's buffers: 8 expert rows per token, each 2 x 4096 bytes of GEMM
    # input and max(4 x 1536, 2 x 4096) of GEMM output; for 8 x 20,224 gathered tokens
    # (with their 16-bit input and output, 4 x 4096 bytes) against one rank's 20,224.
    per_token = 8 * (2 * 4096 + 8192)
    gathered = 8 * 20224 * (per_token + 4 * 4096)
    assert runtime(8, True) - runtime(8, False) == pytest.approx(gathered - 20224 * per_token)
    assert 22 * GIB < gathered < 22.5 * GIB


def test_weights_kept_in_16_bits_multiply_at_the_16_bit_rate() -> None:
    llama, maverick = model("llama-3.1-8b-instruct"), model("llama-4-maverick")
    table = llama.architecture.vocab_size * llama.architecture.hidden_size
    assert sixteen_bit_multiplied(llama, "bf16") == 0.0
    assert sixteen_bit_multiplied(llama, "fp8") == table  # lm_head
    # Meta's Maverick FP8 keeps attention 16-bit; NVIDIA's NVFP4 export quantizes it.
    arch = maverick.architecture
    lm_head = arch.vocab_size * arch.hidden_size
    assert sixteen_bit_multiplied(maverick, "fp8") > lm_head
    assert sixteen_bit_multiplied(maverick, "nvfp4") == lm_head
    # So its FP8 prefill, compute-bound, is slower than it would be at FP8 throughout.
    h200, shape = GPUS["H200"], Workload(4096, 128)
    real = predict(maverick, h200, "fp8", "bf16", 8, 1, 64, shape).prefill_tok_s
    sources = {**maverick.sources, "fp8": HubSource(repo="nvidia/Llama-4-Maverick-FP8")}
    modelopt = maverick.model_copy(update={"sources": sources})
    assert real < predict(modelopt, h200, "fp8", "bf16", 8, 1, 64, shape).prefill_tok_s


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


def _total(c: Candidate, gpus: int) -> float:
    """A candidate's output on one node of `gpus` GPUs: as many replicas as fit."""
    assert c.throughput is not None
    return c.throughput.output_tok_s * (gpus // c.gpus)


@pytest.mark.parametrize(
    "objective",
    [Objective(), Objective(min_user_tok_s=0, max_ttft_s=0), Objective(min_user_tok_s=40)],
)
@pytest.mark.parametrize(
    "name,gpus", [("llama-3.3-70b-instruct", "8xH100-80GB"), ("llama-4-maverick", "8xH200")]
)
def test_the_plan_is_the_best_candidate_under_the_objective(
    objective: Objective, name: str, gpus: str
) -> None:
    entry, cluster = model(name), Cluster.parse(gpus)
    report = evaluate(entry, cluster, objective=objective)
    chosen, plan = report.chosen, report.plan
    assert chosen is not None and plan is not None and chosen.throughput is not None
    total, size = chosen.throughput.output_tok_s * plan.replicas, cluster.total_gpus
    # Every precision and TP is a candidate; none that fits and keeps the bounds does better.
    ok = [c for c in report.candidates if c.fits and c.meets]
    assert {c.precision for c in ok} == {"bf16", "fp8"}
    assert all(_total(c, size) <= total * (1 + 1e-9) for c in ok)
    assert objective.meets(chosen.throughput)
    assert report.runner_up is not None and report.lost_because
    runner = report.runner_up
    assert plan.explanation.startswith(f"Objective: {objective.describe()}.")
    assert f"Runner-up: {runner.precision} {runner.group}" in plan.explanation
    assert report.lost_because in plan.explanation


def test_precision_is_ranked_like_the_other_dimensions() -> None:
    # Maverick fits 8xH200 at bf16 and at fp8; fp8 serves several times more, so it wins, and
    # the explanation says what bf16 would have given.
    entry, cluster = model("llama-4-maverick"), Cluster.parse("8xH200")
    report = evaluate(entry, cluster)
    assert report.plan is not None and report.plan.precision == "fp8"
    assert "bf16 at best TP8 x 1" in report.plan.explanation
    # The objective's floor: lowest=bf16 keeps quality first; nvfp4 is refused by default
    # and allowed by lowest=nvfp4 (B200 runs it).
    strict = plan_model(entry, cluster, objective=Objective(lowest="bf16"))
    assert strict.precision == "bf16" and "fp8: lossier than bf16" in strict.explanation
    scout, b200 = model("llama-4-scout"), Cluster.parse("1xB200")
    assert "nvfp4: lossier than fp8" in plan_model(scout, b200).explanation
    assert plan_model(scout, b200, objective=Objective(lowest="nvfp4")).precision == "nvfp4"
    # --precision is the operator's word: it forces one, floor or not.
    assert plan_model(scout, b200, precision="nvfp4").precision == "nvfp4"


def test_a_model_whose_own_precision_is_4_bit_keeps_it() -> None:
    # gpt-oss ships MXFP4 experts only: the default floor is the model's own precision.
    plan = plan_model(model("gpt-oss-120b"), Cluster.parse("1xH100-80GB"))
    assert plan.precision == "mxfp4"


def test_a_runner_up_that_does_not_fit_says_so() -> None:
    report = evaluate(model("llama-3.3-70b-instruct"), Cluster.parse("2xH100-80GB"))
    assert report.plan is not None and report.runner_up is not None
    assert not report.runner_up.fits
    assert report.lost_because and "does not fit 131072 tokens" in report.lost_because


def test_llama_4_scout_fp8_on_4_h200_is_one_tp4_replica() -> None:
    # Issue 16: "smallest TP that fits" gave 4 x TP1 (~14k tok/s by the planner's own
    # figures) while TP4 predicted ~30k.
    report = evaluate(
        model("llama-4-scout"), Cluster.parse("4xH200"), engine="trtllm", precision="fp8"
    )
    assert report.plan is not None and report.chosen is not None
    assert (report.plan.tensor_parallel, report.plan.replicas) == (4, 1)
    assert report.runner_up is not None and report.runner_up.tensor_parallel == 2
    one = next(c for c in report.candidates if c.tensor_parallel == 1)
    assert one.throughput and report.chosen.throughput
    assert 4 * one.throughput.output_tok_s < report.chosen.throughput.output_tok_s


def test_the_per_user_floor_caps_the_engines_batch() -> None:
    entry, cluster = model("llama-3.1-8b-instruct"), Cluster.parse("1xH200")
    free = evaluate(entry, cluster, objective=Objective(min_user_tok_s=0, max_ttft_s=0))
    strict = evaluate(entry, cluster, objective=Objective(min_user_tok_s=60))
    assert free.plan and strict.plan and free.chosen and strict.chosen
    assert free.plan.max_num_seqs == 1024  # vLLM's own limit: nothing binds
    assert strict.chosen.throughput and strict.chosen.throughput.per_user_tok_s >= 60
    assert strict.plan.max_num_seqs == strict.chosen.throughput.batch < 1024


def test_min_gpus_takes_the_fewest_gpus_for_the_load() -> None:
    entry, cluster = model("llama-3.1-8b-instruct"), Cluster.parse("8xH200")
    plan = plan_model(entry, cluster, objective=Objective("min-gpus", load_tok_s=20_000))
    report = evaluate(entry, cluster, objective=Objective("min-gpus", load_tok_s=20_000))
    assert report.chosen and report.chosen.throughput
    assert plan.replicas * report.chosen.throughput.output_tok_s >= 20_000
    assert plan.replicas * plan.gpus_per_replica < 8
    with pytest.raises(PlanError, match="cannot serve 9,000,000 output tok/s") as err:
        plan_model(entry, cluster, objective=Objective("min-gpus", load_tok_s=9e6))
    assert "--objective throughput" in str(err.value.hint)


def test_objective_text() -> None:
    assert Objective.parse("throughput") == Objective()
    assert Objective.parse("throughput,user=30,ttft=1") == Objective("throughput", 30, 1)
    assert Objective.parse("min-gpus,load=5000").load_tok_s == 5000
    assert Objective.parse("throughput,lowest=nvfp4").lowest == "nvfp4"
    assert Objective().floor("bf16") == "fp8" and Objective().floor("mxfp4") == "mxfp4"
    bad_texts = ("fastest", "throughput,user", "throughput,users=3", "min-gpus", "min-gpus,load=x")
    for bad in (*bad_texts, "throughput,lowest=int3"):
        with pytest.raises(ValueError):
            Objective.parse(bad)


def test_the_configured_memory_fraction_is_used() -> None:
    entry, cluster = model("llama-3.3-70b-instruct"), Cluster.parse("1xH200")
    for engine in ("vllm", "trtllm"):
        low = evaluate(entry, cluster, precision="fp8", engine=engine, memory_fraction=0.7)
        high = evaluate(
            entry, cluster, precision="fp8", engine=engine, memory_fraction={engine: 0.95}
        )
        assert low.chosen and high.chosen
        assert low.chosen.max_seqs < high.chosen.max_seqs
        assert low.chosen.memory.free < high.chosen.memory.free
    need = memory_needed(entry, GPUS["H200"], "fp8", context=8192, memory_fraction=0.5)
    assert need == pytest.approx(2 * memory_needed(entry, GPUS["H200"], "fp8", context=8192) * 0.9)


def test_trtllm_keeps_llama_4_chunked_layers_whole_and_vllm_does_not() -> None:
    scout, per_layer = model("llama-4-scout"), 2 * 8 * 128 * 2
    assert kv_bytes(scout, 131072, "bf16", 1, engine="vllm") == per_layer * (
        12 * 131072 + 36 * 8192
    )
    assert kv_bytes(scout, 131072, "bf16", 1, engine="trtllm") == per_layer * 48 * 131072
    gemma = model("gemma-3-27b-it")  # sliding windows are capped by both
    assert kv_bytes(gemma, 65536, "bf16", 1, engine="trtllm") == kv_bytes(gemma, 65536, "bf16", 1)


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
    assert "8xH100-80GB at fp8 (TP8)" in str(err.value.hint)


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
    fewest = Objective("min-gpus", load_tok_s=1)  # the smallest group: bf16 TP2
    entry = model("llama-3.3-70b-instruct")
    first = plan_model(entry, cluster, replicas=3, objective=fewest, precision="bf16")
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
    assert "Plan: vllm, fp8" in result.output
    assert "TP8, 1 replica(s) of 8 H100-80GB" in result.output
    assert "Objective: most output tok/s" in result.output and "Runner-up:" in result.output


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


def test_plan_command_takes_an_objective(run_plan: RunPlan) -> None:
    args = ("llama-3.1-8b-instruct", "--gpus", "8xH200", "--json")
    data = json.loads(run_plan(*args, "--objective", "min-gpus,load=20000").output)
    assert data["objective"]["kind"] == "min-gpus"
    assert data["plan"]["replicas"] * data["plan"]["gpus_per_replica"] < 8
    assert data["runner_up"] is not None and data["lost_because"]
    result = run_plan("llama-3.1-8b-instruct", "--gpus", "8xH200", "--objective", "fast")
    assert result.exit_code == 2 and "throughput" in result.output


def test_plan_command_uses_the_configured_memory_fraction(run_plan: RunPlan) -> None:
    args = ("llama-3.3-70b-instruct", "--gpus", "1xH200", "--precision", "fp8", "--json")
    default = json.loads(run_plan(*args).output)
    Path("appliance.toml").write_text("[engines.vllm]\ngpu_memory_fraction = 0.8\n")
    lower = json.loads(run_plan(*args).output)
    assert lower["chosen"]["memory_gib"]["free"] < default["chosen"]["memory_gib"]["free"] - 10
