"""How an engine command runs: as a process from its own virtualenv, or in a container.

vLLM and TensorRT-LLM pin different torch builds, so neither runs in the appliance's
own environment. The process runner swaps the program for the configured executable
(`engines.<name>.command`) or, for vLLM on a CPU plan, the Python of the CPU build the
appliance installs itself (cpuenv); the container runner wraps the command in `docker
run` or `podman run` with exactly the replica's GPUs, host IPC and network, and the model
store mounted read-only. CPU plans always run as a process (the images are CUDA builds).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from appliance.config import EnginesConfig
from appliance.control import PLACEMENT_GROUP_ENV
from appliance.engines.base import EngineLaunch, LaunchSpec
from appliance.engines.cpuenv import CpuEngineEnv
from appliance.errors import EngineError


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]
    # Run after stopping the process, when that alone does not stop the engine.
    stop: list[str] | None = None


# Read by ray.init in the engine process (Ray's own job-submission variable): the job's
# runtime environment, here its workers' interpreter.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_workers_run(python: str) -> str:
    """The engine's Ray workers (vLLM's, one per GPU of a replica across nodes) run in the
    engine's own Python, at the same path on every node. Without it Ray starts them with
    the Python each node's raylet runs, the appliance's, which has no vLLM. (Measured on
    Ray 2.60: a driver in vLLM's environment got workers in the raylet's Python by
    default, in its own with this set.)"""
    return json.dumps({"runtime_env": {"py_executable": python}})


def container_name(model: str, replica_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"appliance-{model}-{replica_id}")


def engine_command(
    launch: LaunchSpec,
    engine_launch: EngineLaunch,
    engine: str,
    engines: EnginesConfig,
    name: str,
    base_env: Mapping[str, str],
) -> EngineCommand:
    settings = engines.of(engine)
    devices = ",".join(launch.gpu_ids)
    if launch.plan.on_cpu or engines.runner == "process":
        argv = list(engine_launch.argv)
        if settings.command:
            argv[0] = settings.command
        elif launch.plan.on_cpu and engine == "vllm":
            argv[0] = str(CpuEngineEnv.of(engines).python)
        # Exactly the devices Ray assigned to this replica, and no others.
        env = {
            **base_env,
            **engine_launch.env,
            **engine_launch.secret_env,
            "CUDA_VISIBLE_DEVICES": devices,
        }
        if PLACEMENT_GROUP_ENV in env:
            env[RAY_JOB_CONFIG_ENV] = ray_workers_run(argv[0])
        return EngineCommand(argv, env)
    if PLACEMENT_GROUP_ENV in engine_launch.env:
        raise EngineError(
            f"{launch.model}'s replica spans nodes, and its engine's Ray workers cannot run "
            "inside a container: Ray starts them on each node with a Python on the host",
            hint='Set engines.runner = "process" and engines.vllm.command to the Python of '
            "a vLLM virtualenv installed at the same path on every node.",
        )
    if not settings.image:
        raise EngineError(
            f"no container image is configured for the {engine} engine",
            hint=f"Set engines.{engine}.image in appliance.toml, or use engines.runner = "
            '"process".',
        )
    cli = engines.container_cli
    argv = [cli, "run", "--rm", "--name", name, "--init", "--ipc=host", "--network=host"]
    if launch.gpu_ids:
        if cli == "docker":
            # The quotes keep docker's CSV parser from splitting the device list.
            argv += ["--gpus", f'"device={devices}"']
        else:
            for gpu in launch.gpu_ids:
                argv += ["--device", f"nvidia.com/gpu={gpu}"]
    for path, mode in ((launch.weights, "ro"), (launch.work_dir, "ro")):
        argv += ["-v", f"{path}:{path}:{mode}"]
    # The image's HEALTHCHECK probes this port (the engine's own, on the host network).
    env = {**engine_launch.env, "APPLIANCE_ENGINE_PORT": str(launch.port)}
    for key, value in sorted(env.items()):
        argv += ["-e", f"{key}={value}"]
    # Secrets by name only: docker and podman take the value from their own environment,
    # so it never shows in the command line (ps, status, logs).
    for key in sorted(engine_launch.secret_env):
        argv += ["-e", key]
    argv += ["--entrypoint", engine_launch.argv[0], settings.image, *engine_launch.argv[1:]]
    return EngineCommand(
        argv, {**base_env, **engine_launch.secret_env}, stop=[cli, "rm", "-f", name]
    )
