"""Every flag the engine adapters emit exists in the real engine, with a value of the
right type, for every catalog model x GPU type x engine the planner accepts (and the CPU
plan of the builtin model); every metric the adapters read is one the engine emits.

vLLM is checked twice: against its own argument parser, run by the Python of the CPU build
the appliance installs (the same argument code as the CUDA build, so GPU-only flags are
checked too), and against the argument list read from that release
(tests/fixtures/contracts/vllm-0.32-args.json, made by vllm_contract.py beside it). Its
metric names come from a real run (vllm-0.32-metrics.txt; tests/test_e2e.py reads the
live page as well). trtllm-serve's contract was read from its source (see its header).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import versions
from appliance.catalog import ModelEntry, load_catalog
from appliance.config import EngineConfig, EnginesConfig
from appliance.engines import get_adapter
from appliance.engines.base import EngineLaunch, LaunchSpec
from appliance.engines.cpuenv import CpuEngineEnv
from appliance.engines.runner import RAY_JOB_CONFIG_ENV, engine_command
from appliance.engines.vllm import SERVER_MODULE
from appliance.errors import EngineError
from appliance.gpus import GPUS
from appliance.placement import Cluster
from appliance.planner import Plan, evaluate, plan_model

CONTRACTS = Path(__file__).parent / "fixtures" / "contracts"
STORE = Path("/srv/appliance/models")
VLLM_PROGRAM = ["python3", "-m", SERVER_MODULE]

_vllm = json.loads((CONTRACTS / "vllm-0.32-args.json").read_text())
VLLM_FLAGS = {"--" + f.replace("_", "-") for f in _vllm["engine_args"] + _vllm["frontend_args"]}
VLLM_METRICS = {
    line.strip()
    for line in (CONTRACTS / "vllm-0.32-metrics.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}
_trt = json.loads((CONTRACTS / "trtllm-serve.json").read_text())
TRT_OPTIONS: dict[str, dict[str, Any]] = {}
for _option in _trt["options"]:
    for _name in [*_option["name"].split("/"), *_option.get("aliases", [])]:
        if _name.startswith("--"):
            TRT_OPTIONS[_name] = _option
TRT_METRICS = {
    name for value in _trt["metrics"].values() if isinstance(value, list) for name in value
}

# The vLLM contract lists names only; these types come from the annotations of the same
# dataclass fields (AsyncEngineArgs, FrontendArgs) in vLLM 0.32.0 (its own parser checks
# them for real in test_every_vllm_command_line_parses_with_vllms_own_parser).
Check = Callable[[str], bool]


def _is_int(value: str) -> bool:
    return re.fullmatch(r"[1-9][0-9]*", value) is not None


def _is_fraction(value: str) -> bool:
    try:
        return 0 < float(value) <= 1
    except ValueError:
        return False


def _one_of(*choices: str) -> Check:
    return lambda value: value in choices


def _text(value: str) -> bool:
    return bool(value) and not value.startswith("--")


VLLM_VALUES: dict[str, Check] = {
    "--model": _text,
    "--served-model-name": _text,
    "--host": _text,
    "--port": _is_int,
    "--tensor-parallel-size": _is_int,
    "--pipeline-parallel-size": _is_int,
    "--gpu-memory-utilization": _is_fraction,
    "--kv-cache-dtype": _one_of("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"),
    "--dtype": _one_of("auto", "half", "float16", "bfloat16", "float", "float32"),
    "--max-model-len": _is_int,
    "--max-num-seqs": _is_int,
    "--quantization": _one_of("fp8", "awq", "gptq", "awq_marlin", "gptq_marlin"),
    "--runner": _one_of("auto", "generate", "pooling", "draft"),
    "--distributed-executor-backend": _one_of("ray", "mp", "uni", "external_launcher"),
    "--tool-call-parser": _text,
    "--reasoning-parser": _text,
    "--chat-template": _text,
    "--kv-cache-memory-bytes": _is_int,
}
VLLM_SWITCHES = {
    "--enforce-eager",
    "--enable-prefix-caching",
    "--enable-expert-parallel",
    "--enable-auto-tool-choice",
    "--disable-uvicorn-access-log",
}


def _trt_check(option: dict[str, Any]) -> Check | None:
    """None for a switch; else how to check the value, from the contract's type."""
    kind = str(option.get("type", ""))
    if kind.startswith("flag") or kind.startswith("bool"):
        return None
    if kind == "int" or kind.startswith("IntRange"):
        return _is_int
    if kind == "float":
        return _is_fraction
    if kind.startswith("Choice["):
        return _one_of(*re.findall(r"'([^']+)'", kind))
    if kind.startswith("Choice("):
        note = str(option.get("note", ""))
        listed = note.split(":", 1)[1].split("(")[0] if ":" in note else ""
        return _one_of(*(c.strip() for c in listed.split(",") if c.strip()))
    if kind == "Choice":
        return _one_of("pytorch")
    return _text


def _parse(argv: list[str], program: list[str], switch: Callable[[str], bool]) -> dict[str, str]:
    """Flag -> value ('' for switches) after the program (`trtllm-serve serve MODEL`)."""
    assert argv[: len(program)] == program, argv
    rest = argv[len(program) :]
    flags: dict[str, str] = {}
    i = 0
    while i < len(rest):
        flag = rest[i]
        assert flag.startswith("--"), f"stray argument {flag!r} in {argv}"
        assert flag not in flags, f"{flag} given twice"
        if switch(flag):
            flags[flag] = ""
            i += 1
        else:
            assert i + 1 < len(rest), f"{flag} has no value"
            flags[flag] = rest[i + 1]
            i += 2
    return flags


def _vllm_flags(argv: list[str]) -> dict[str, str]:
    flags = _parse(argv, VLLM_PROGRAM, lambda f: f in VLLM_SWITCHES)
    assert flags["--model"].startswith(str(STORE)), "the model is served from the store"
    return flags


def _trt_flags(argv: list[str]) -> dict[str, str]:
    assert argv[2].startswith(str(STORE)), "the model is served from the store"
    return _parse(
        argv[:2] + argv[3:],
        ["trtllm-serve", "serve"],
        lambda f: _trt_check(TRT_OPTIONS.get(f, {})) is None,
    )


def _spec(entry: ModelEntry, plan: Plan, **more: Any) -> LaunchSpec:
    return LaunchSpec(
        model=entry.name,
        weights=STORE / entry.name,
        host="10.0.0.5",
        port=8101,
        entry=entry,
        plan=plan,
        gpu_ids=tuple(str(i) for i in range(plan.gpus_per_replica)),
        work_dir=Path("/var/lib/appliance/run/engines") / f"{entry.name}-r1",
        ray_address="10.0.0.1:6379",
        **more,
    )


def _launch(entry: ModelEntry, plan: Plan, engine: str, **more: Any) -> EngineLaunch:
    adapter = get_adapter(engine, EngineConfig(chat_template_dir=Path("/templates")))
    return adapter.launch(_spec(entry, plan, **more))


def _combinations() -> list[tuple[str, str, str, str]]:
    combos = []
    for entry in load_catalog():
        for engine in ("vllm", "trtllm"):
            if engine not in entry.engines:
                continue
            for gpu in GPUS:
                for cluster in (f"8x{gpu}", f"2x8x{gpu}"):
                    combos.append((entry.name, gpu, cluster, engine))
    return combos


COMBOS = _combinations()


@pytest.mark.parametrize(("model", "gpu", "cluster", "engine"), COMBOS)
def test_every_emitted_flag_exists_with_a_value_of_the_right_type(
    model: str, gpu: str, cluster: str, engine: str
) -> None:
    entry = load_catalog().get(model)
    report = evaluate(entry, Cluster.parse(cluster), engine=engine)
    if report.plan is None:
        pytest.skip(f"the planner does not accept {model} on {cluster} with {engine}")
    plan = report.plan
    try:
        launch = _launch(entry, plan, engine)
    except EngineError:
        # TensorRT-LLM refuses plans across hosts and embedding models, by design.
        assert engine == "trtllm"
        assert plan.spans_nodes or entry.kind == "embedding"
        return
    if engine == "vllm":
        flags = _vllm_flags(launch.argv)
        unknown = set(flags) - VLLM_FLAGS
        assert not unknown, f"flags vLLM {versions.VLLM} does not have: {unknown}"
        for flag, value in flags.items():
            if flag not in VLLM_SWITCHES:
                assert flag in VLLM_VALUES, f"no type known for {flag}"
                assert VLLM_VALUES[flag](value), f"{flag} {value!r}"
        if plan.on_cpu:  # a builtin model: vLLM's CPU build, whatever GPUs are there
            assert "--tensor-parallel-size" not in flags and "--enforce-eager" in flags
        else:
            assert flags["--tensor-parallel-size"] == str(plan.tensor_parallel)
            assert flags["--pipeline-parallel-size"] == str(plan.pipeline_parallel)
        assert flags["--served-model-name"] == model
    else:
        flags = _trt_flags(launch.argv)
        unknown = set(flags) - set(TRT_OPTIONS)
        assert not unknown, f"flags trtllm-serve does not have: {unknown}"
        for flag, value in flags.items():
            check = _trt_check(TRT_OPTIONS[flag])
            assert check is None or check(value), f"{flag} {value!r}"
        assert flags["--tensor_parallel_size"] == str(plan.tensor_parallel)
        assert Path(flags["--config"]).name in launch.files
        assert "return_perf_metrics: true" in launch.files[Path(flags["--config"]).name]
    assert launch.engine_model == model
    if plan.max_model_len:
        assert str(plan.max_model_len) in launch.argv


def test_the_planner_accepts_many_combinations() -> None:
    accepted = 0
    for model, _, cluster, engine in COMBOS:
        if evaluate(load_catalog().get(model), Cluster.parse(cluster), engine=engine).plan:
            accepted += 1
    # Guards against a planner change that silently skips the whole contract test.
    assert accepted >= len(COMBOS) // 2, (accepted, len(COMBOS))


def test_metric_names_exist_in_the_engines() -> None:
    for engine, known in (("vllm", VLLM_METRICS), ("trtllm", TRT_METRICS)):
        adapter = get_adapter(engine)
        assert adapter.load_metrics is not None
        missing = set(adapter.load_metrics) - known
        assert not missing, f"{engine} emits no {missing}"


def test_load_is_read_from_prometheus_text() -> None:
    vllm = get_adapter("vllm").parse_load(
        "# HELP vllm:num_requests_running x\n"
        'vllm:num_requests_running{model_name="m",engine="0"} 3.0\n'
        'vllm:num_requests_running{model_name="m",engine="1"} 2.0\n'
        'vllm:num_requests_waiting{model_name="m",engine="0"} 7.0\n'
        'vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.25\n'
    )
    assert vllm is not None and (vllm.running, vllm.waiting, vllm.kv_cache_usage) == (5, 7, 0.25)
    trt = get_adapter("trtllm").parse_load(
        'trtllm_num_requests_running{model_name="m",engine_type="pytorch"} 4\n'
        'trtllm_num_requests_waiting{model_name="m",engine_type="pytorch"} 1\n'
    )
    assert trt is not None and (trt.running, trt.waiting, trt.kv_cache_usage) == (4, 1, None)
    assert get_adapter("vllm").parse_load("# nothing yet\n") is None


def test_multi_node_plans_use_vllms_ray_executor() -> None:
    entry = load_catalog().get("llama-3.1-405b-instruct")
    report = evaluate(entry, Cluster.parse("2x8xH100-80GB"), engine="vllm", precision="bf16")
    assert report.plan is not None, report.problem
    plan = report.plan
    assert plan.pipeline_parallel > 1
    assert plan.spans_nodes
    launch = _launch(entry, plan, "vllm")
    flags = _vllm_flags(launch.argv)
    assert flags["--distributed-executor-backend"] == "ray"
    assert launch.env["RAY_ADDRESS"] == "10.0.0.1:6379"
    with pytest.raises(EngineError, match="MPI"):
        _launch(entry, plan, "trtllm")


def test_a_replica_across_nodes_runs_vllms_ray_workers_in_the_engines_python() -> None:
    entry = load_catalog().get("llama-3.1-405b-instruct")
    report = evaluate(entry, Cluster.parse("2x8xH100-80GB"), engine="vllm", precision="bf16")
    assert report.plan is not None and report.plan.spans_nodes, report.problem
    group = {"placement_group": "ab" * 18, "bundle_indices": tuple(range(16))}
    spec = _spec(entry, report.plan, **group)
    launch = _launch(entry, report.plan, "vllm", **group)
    engines = EnginesConfig(vllm=EngineConfig(command="/opt/vllm/bin/python"))
    command = engine_command(spec, launch, "vllm", engines, "c", {})
    assert command.argv[0] == "/opt/vllm/bin/python"
    job = json.loads(command.env[RAY_JOB_CONFIG_ENV])
    assert job == {"runtime_env": {"py_executable": "/opt/vllm/bin/python"}}
    in_containers = EnginesConfig(runner="container", vllm=EngineConfig(image="vllm:test"))
    with pytest.raises(EngineError, match="spans nodes") as refused:
        engine_command(spec, launch, "vllm", in_containers, "c", {})
    assert 'engines.runner = "process"' in (refused.value.hint or "")
    # One node's replica: no Ray executor, no job environment.
    single = plan_model(entry, Cluster.parse("8xH200"), engine="vllm", precision="fp8")
    assert not single.spans_nodes
    alone = engine_command(
        _spec(entry, single), _launch(entry, single, "vllm"), "vllm", engines, "c", {}
    )
    assert RAY_JOB_CONFIG_ENV not in alone.env


def _tiny_launch(gpus: int) -> tuple[LaunchSpec, EngineLaunch]:
    entry = load_catalog().get("llama-3.1-8b-instruct")
    plan = Plan(engine="vllm", precision="bf16", tensor_parallel=gpus, gpus_per_replica=gpus)
    spec = LaunchSpec(
        model=entry.name,
        weights=STORE / entry.name,
        host="127.0.0.1",
        port=8101,
        entry=entry,
        plan=plan,
        gpu_ids=("2", "3")[:gpus],
        work_dir=Path("/run/e"),
    )
    return spec, get_adapter("vllm").launch(spec)


def test_process_runner_uses_the_engines_own_executable_and_only_its_gpus() -> None:
    spec, launch = _tiny_launch(2)
    engines = EnginesConfig(vllm=EngineConfig(command="/opt/engines/vllm/bin/python"))
    cmd = engine_command(spec, launch, "vllm", engines, "c1", {"PATH": "/usr/bin"})
    assert cmd.argv[0] == "/opt/engines/vllm/bin/python" and cmd.argv[1:] == launch.argv[1:]
    assert cmd.argv[1:3] == ["-m", SERVER_MODULE]
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert cmd.env["HF_HUB_OFFLINE"] == "1" and cmd.stop is None


@pytest.mark.parametrize("cli", ["docker", "podman"])
def test_container_runner(cli: str) -> None:
    spec, launch = _tiny_launch(2)
    engines = EnginesConfig(runner="container", container_cli=cli)  # type: ignore[arg-type]
    cmd = engine_command(spec, launch, "vllm", engines, "appliance-m-r1", {})
    argv = cmd.argv
    assert argv[:3] == [cli, "run", "--rm"] and "--ipc=host" in argv
    if cli == "docker":
        assert argv[argv.index("--gpus") + 1] == '"device=2,3"'
    else:
        devices = [argv[i + 1] for i, a in enumerate(argv) if a == "--device"]
        assert devices == ["nvidia.com/gpu=2", "nvidia.com/gpu=3"]
    assert f"{spec.weights}:{spec.weights}:ro" in argv
    image = argv.index(f"appliance/engine-vllm:{versions.VLLM}")
    assert argv[argv.index("--entrypoint") + 1] == "python3"
    assert argv[image + 1 :] == launch.argv[1:]
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env  # the container sees only its GPUs
    assert f"APPLIANCE_ENGINE_PORT={spec.port}" in argv  # for the image's HEALTHCHECK
    assert cmd.stop == [cli, "rm", "-f", "appliance-m-r1"]


def test_named_chat_templates_come_from_the_image_or_from_config() -> None:
    entry = load_catalog().get("llama-3.1-8b-instruct")
    assert entry.chat_template
    in_containers = EnginesConfig(runner="container").of("vllm")
    assert in_containers.chat_template_dir == Path("/vllm-workspace/examples")
    # A process runner's virtualenv has no examples: the tokenizer's template is used.
    spec, _ = _tiny_launch(1)
    launch = get_adapter("vllm", EnginesConfig().of("vllm")).launch(spec)
    assert "--chat-template" not in launch.argv
    launch = get_adapter("vllm", in_containers).launch(spec)
    template = launch.argv[launch.argv.index("--chat-template") + 1]
    assert template == f"/vllm-workspace/examples/tool_chat_template_{entry.chat_template}.jinja"


def test_trtllm_is_never_planned_across_hosts() -> None:
    entry = load_catalog().get("llama-3.1-405b-instruct")
    report = evaluate(entry, Cluster.parse("2x8xH100-80GB"), engine="trtllm", precision="bf16")
    assert report.plan is None or not report.plan.spans_nodes


def test_a_partial_engine_table_keeps_the_other_defaults() -> None:
    engines = EnginesConfig.model_validate(
        {"runner": "container", "vllm": {"command": "/opt/vllm/bin/vllm"}}
    )
    settings = engines.of("vllm")
    assert settings.command == "/opt/vllm/bin/vllm"
    assert settings.image == f"appliance/engine-vllm:{versions.VLLM}"
    assert engines.of("trtllm").image == f"appliance/engine-trtllm:{versions.TRTLLM}"


def _cpu_launch(command: str | None = None) -> tuple[LaunchSpec, EngineLaunch, EnginesConfig]:
    entry = load_catalog().get("tiny-random-llama")
    plan = evaluate(entry, Cluster.parse("8xH100-80GB")).plan
    assert plan is not None and plan.on_cpu  # a builtin model runs on the CPU anywhere
    spec = LaunchSpec(
        model=entry.name,
        weights=STORE / entry.name,
        host="127.0.0.1",
        port=8101,
        entry=entry,
        plan=plan,
        work_dir=Path("/run/e"),
    )
    engines = EnginesConfig(
        runner="container", env_dir=Path("/var/cache/engines"), vllm=EngineConfig(command=command)
    )
    return spec, get_adapter("vllm", engines.of("vllm")).launch(spec), engines


def test_a_cpu_plan_gets_vllms_cpu_flags_and_environment() -> None:
    _, launch, _ = _cpu_launch()
    flags = _vllm_flags(launch.argv)
    assert "--enforce-eager" in flags  # no torch.compile: start-up stays cheap
    # The KV cache is sized from the plan, not as a share of the host's memory.
    assert "--gpu-memory-utilization" not in flags
    kv = int(flags["--kv-cache-memory-bytes"])
    assert 64 * 2**20 <= kv <= 256 * 2**20
    assert flags["--max-model-len"] == "2048" and flags["--max-num-seqs"] == "8"
    assert flags["--tool-call-parser"] == "hermes" and "--enable-auto-tool-choice" in flags
    assert "--tensor-parallel-size" not in flags and "--kv-cache-dtype" not in flags
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert launch.env["OMP_NUM_THREADS"] == "1"
    assert launch.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # no separate worker
    assert launch.env["HF_HUB_OFFLINE"] == "1"
    assert launch.secret_env == {}  # no key in this spec; the replica passes one


def test_a_cpu_plan_runs_the_appliances_own_cpu_build_as_a_process() -> None:
    spec, launch, engines = _cpu_launch()
    cmd = engine_command(spec, launch, "vllm", engines, "c1", {})
    # A process even with runner = "container": the images are CUDA builds.
    assert cmd.stop is None
    python = Path("/var/cache/engines") / f"vllm-cpu-{versions.VLLM}" / "bin" / "python"
    assert cmd.argv[0] == str(python) and cmd.argv[1:] == launch.argv[1:]
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == ""
    spec, launch, engines = _cpu_launch(command="/opt/vllm/bin/python")
    assert engine_command(spec, launch, "vllm", engines, "c1", {}).argv[0] == "/opt/vllm/bin/python"


def _every_vllm_argv() -> list[list[str]]:
    argvs = [_cpu_launch()[1].argv]
    for model, _, cluster, engine in COMBOS:
        if engine != "vllm":
            continue
        entry = load_catalog().get(model)
        plan = evaluate(entry, Cluster.parse(cluster), engine=engine).plan
        if plan is not None:
            argvs.append(_launch(entry, plan, engine).argv)
    return argvs


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The CPU build `appliance up` installs (installed here if this is the first use)."""
    env = CpuEngineEnv.of(EnginesConfig())
    env.ensure()
    return env.python


def test_every_vllm_command_line_parses_with_vllms_own_parser(
    vllm_python: Path, tmp_path: Path
) -> None:
    argvs = _every_vllm_argv()
    assert len(argvs) > 50
    # vLLM opens a --chat-template it is given: the catalog's names, as stand-in files.
    templates = {a for argv in argvs for a in argv if a.startswith("/templates/")}
    for name in templates:
        (tmp_path / Path(name).name).write_text("{{ messages[0]['content'] }}")
    argvs = [[str(tmp_path / Path(a).name) if a in templates else a for a in v] for v in argvs]
    result = subprocess.run(
        [str(vllm_python), str(CONTRACTS / "vllm_contract.py"), "check"],
        input=json.dumps([argv[len(VLLM_PROGRAM) :] for argv in argvs]),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # The weights paths do not exist here; in offline mode vLLM would resolve each as a
        # Hub repo id (and fail), whatever the flags. Nothing is downloaded either way.
        env={**os.environ, "HF_HUB_OFFLINE": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = json.loads(result.stdout.splitlines()[-1])
    failed = [(argv, v["error"]) for argv, v in zip(argvs, verdicts, strict=True) if not v["ok"]]
    assert not failed, failed[:3]
    assert {v["model"] for v in verdicts} == {_vllm_flags(a)["--model"] for a in argvs}


def test_the_args_fixture_is_the_pinned_release() -> None:
    assert _vllm["vllm_version"] == versions.VLLM
