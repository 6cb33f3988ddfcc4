"""`appliance plan MODEL`: what the planner would do with a model on some GPUs, and why."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from appliance.catalog import ModelEntry, load_catalog
from appliance.cli.common import config_of, console, print_json, print_table
from appliance.config import ApplianceConfig
from appliance.control.cluster import given_or_viewed
from appliance.control.launch import engine_start, replica_spec
from appliance.errors import PlanError
from appliance.planner import (
    GIB,
    Candidate,
    Objective,
    Plan,
    PlanReport,
    Workload,
    evaluate,
)


def plan(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Catalog name, e.g. llama-4-scout."),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        help="GPUs to plan for: COUNTxTYPE or NODESxCOUNTxTYPE, '+' between node kinds "
        "(8xH100-80GB, 2x8xH200, cpu). Default: the GPUs of the Ray cluster (the running "
        "appliance's, or [ray].address), or of this host (nvidia-smi) without one.",
    ),
    context: int | None = typer.Option(
        None,
        "--context",
        min=1,
        help="Longest sequence in tokens (default: the model's, up to 128k).",
    ),
    concurrency: int = typer.Option(
        0,
        "--concurrency",
        min=0,
        help="Sequences of full context that must fit at once; also the batch of the "
        "throughput prediction. 0: one must fit, predict at as many as fit.",
    ),
    workload: str = typer.Option(
        "1000:1000", "--workload", help="Mean input:output tokens per request, for throughput."
    ),
    precision: str | None = typer.Option(
        None,
        "--precision",
        help="Force a precision (bf16, fp8, nvfp4, mxfp4, int4-awq, ...), whatever the "
        "objective's floor.",
    ),
    engine: str | None = typer.Option(None, "--engine", help="Force an engine: vllm or trtllm."),
    objective: str = typer.Option(
        "throughput",
        "--objective",
        help="How plans are ranked: 'throughput' (most output tok/s from the GPUs, every "
        "request at >= 20 tok/s, first token within 2 s) or 'min-gpus,load=TOK_S' (fewest "
        "GPUs for that load); bounds with user=TOK_S and ttft=SECONDS, 0 drops one "
        "(throughput,user=0,ttft=0 is the benchmarks' max throughput); precision is ranked "
        "too, down to fp8 unless lowest=PRECISION (e.g. lowest=nvfp4) allows lossier ones.",
    ),
    print_command: bool = typer.Option(
        False,
        "--print-command",
        help="Also print the exact engine command line for one replica, to run it by hand.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the plan for a model: precision, tensor parallelism, memory, throughput, placement."""
    config = config_of(ctx)
    entry = load_catalog(config.catalog).get(model)
    try:
        cluster = given_or_viewed(config, gpus)
        shape = Workload.parse(workload)
        goal = Objective.parse(objective)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    report = evaluate(
        entry,
        cluster,
        context=context,
        concurrency=concurrency or None,
        workload=shape,
        precision=precision,
        engine=engine,
        objective=goal,
        memory_fraction=config.engines.memory_fractions(),
    )
    command = None
    if print_command and report.plan is not None:
        command = engine_command_line(config, entry, report.plan)
    if as_json:
        print_json({**report.to_dict(), **({"command": command} if command else {})})
    else:
        show(report)
        if command:
            console.print("\n[bold]Engine command for one replica[/] (run by hand to debug):")
            print(shell_snippet(command))
    if report.plan is None:
        raise PlanError(report.problem or f"no plan for {model}", hint=report.hint)


def show(report: PlanReport) -> None:
    """The human form: candidates, then the chosen plan and why."""
    w = report.workload
    console.print(
        f"[bold]{report.model}[/] on {report.cluster}: engine {report.engine}, context "
        f"{report.context} tokens, workload {w.input_tokens}:{w.output_tokens}"
    )
    if report.candidates:
        _candidates(report)
        for note in dict.fromkeys(c.note for c in report.candidates if c.note):
            console.print(f"Note: {note}.")
        console.print(
            "Memory is GiB per GPU: KV holds the required sequences at full context; overhead is "
            "runtime (activations, CUDA graphs, NCCL) plus the headroom the engine leaves; free "
            "also goes to the KV cache. max seqs: full-context sequences that fit. batch: "
            "sequences of the workload the prediction runs: as many as fit and keep the "
            'objective\'s bounds (unless --concurrency); ✗ in "ok": the bounds fail even at '
            "one sequence. Throughput and TTFT are per replica."
        )
    plan = report.plan
    if plan is None:
        return
    if plan.on_cpu:
        console.print(
            f"[bold]Plan:[/] {plan.engine} on the CPU (vLLM's CPU build), {plan.precision}, "
            f"1 replica, no GPUs, max_model_len {plan.max_model_len}, max_num_seqs "
            f"{plan.max_num_seqs}."
        )
        return
    chosen = report.chosen
    total = ""
    if chosen and chosen.throughput:
        total = f", about {chosen.throughput.output_tok_s * plan.replicas:,.0f} output tok/s in all"
    group = f"TP{plan.tensor_parallel}" + (
        f" x PP{plan.pipeline_parallel}" if plan.pipeline_parallel > 1 else ""
    )
    console.print(
        f"[bold]Plan:[/] {plan.engine}, {plan.precision} (KV cache {plan.kv_cache_dtype}), "
        f"{group}, {plan.replicas} replica(s) of {plan.gpus_per_replica} {plan.gpu}, "
        f"max_model_len {plan.max_model_len}{total}."
    )
    console.print(plan.explanation)


def _candidates(report: PlanReport) -> None:
    headers = (
        "",
        "precision",
        "GPUs",
        "group",
        "weights",
        "KV",
        "overhead",
        "free",
        "max seqs",
        "batch",
        "prefill tok/s",
        "output tok/s",
        "per user",
        "TTFT s",
        "ok",
    )
    rows = []
    for c in report.candidates:
        mark = "→" if c is report.chosen else ("" if c.fits else "✗")
        rows.append([mark, c.precision, str(c.gpus), _group(c), *_memory(c), *_speed(c)])
    # Mark, precision and GPUs name a candidate: a narrow terminal repeats them per table.
    print_table(headers, rows, keys=3)


def _group(c: Candidate) -> str:
    return c.layout or c.group


def _memory(c: Candidate) -> list[str]:
    m = c.memory
    return [f"{value / GIB:.1f}" for value in (m.weights, m.kv, m.overhead, m.free)]


def _speed(c: Candidate) -> list[str]:
    if c.throughput is None:
        return [str(c.max_seqs), "", "", "", "", "", ""]
    t = c.throughput
    return [
        str(c.max_seqs),
        str(t.batch),
        f"{t.prefill_tok_s:,.0f}",
        f"{t.output_tok_s:,.0f}",
        f"{t.per_user_tok_s:,.0f}",
        f"{t.ttft_s:.2f}",
        "✓" if c.meets else "✗",
    ]


def engine_command_line(config: ApplianceConfig, entry: ModelEntry, plan: Plan) -> dict[str, Any]:
    """argv, env and files of one replica's engine, as the appliance would start it: the
    replica's own builder, given placeholders for what only Ray decides."""
    spec = replica_spec(config, entry, plan, ray_address="RAY_HEAD:6379")
    start = engine_start(
        spec,
        host="0.0.0.0",
        port=8001,
        gpu_ids=[str(i) for i in range(plan.tensor_parallel if plan.gpus_per_replica else 0)],
        work_dir=Path(spec.work_dir) / entry.name,
        container=f"{entry.name}-debug",
        base_env={},
        with_api_key=False,
    )
    launch, cmd = start.launch, start.command
    env = {k: v for k, v in cmd.env.items() if k in launch.env or k == "CUDA_VISIBLE_DEVICES"}
    files = {str(start.spec.work_dir / name): content for name, content in launch.files.items()}
    return {"argv": cmd.argv, "env": env, "files": files}


def shell_snippet(command: dict[str, Any]) -> str:
    """A copy-paste shell form: files written first, then the command with its env."""
    lines = []
    for path, content in command["files"].items():
        lines += [f"mkdir -p {shlex.quote(str(Path(path).parent))}"]
        lines += [f"cat > {shlex.quote(path)} <<'EOF'", content.rstrip("\n"), "EOF"]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(command["env"].items()))
    argv = command["argv"]
    # One flag (and its value) per line reads better than one 400-character line.
    parts = [shlex.quote(argv[0])]
    for arg in argv[1:]:
        if arg.startswith("--"):
            parts.append(" \\\n    " + arg)
        else:
            parts.append(" " + shlex.quote(arg))
    lines.append((env + " \\\n" if env else "") + "".join(parts))
    return "\n".join(lines)
