"""Commands the suite starts when its tests are known and a test collects later: the lint
gate's mypy run (a minute of one core) then overlaps the tests before it.

tests/conftest.py starts them (`start`) and stops what is left at the session's end
(`stop_all`); the test calls `result`, which runs the command itself when nothing started it
(a test run on its own).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO

_started: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}


def start(name: str, argv: list[str], cwd: Path) -> None:
    out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by result or stop_all)
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.nice(10),  # behind the tests that run meanwhile
    )
    _started[name] = (proc, out)


def result(name: str, argv: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """The command's exit code and output."""
    if name not in _started:
        done = subprocess.run(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
        )
        return done.returncode, done.stdout.decode(errors="replace")
    proc, out = _started.pop(name)
    try:
        code = proc.wait(timeout=timeout)
        out.seek(0)
        return code, out.read().decode(errors="replace")
    finally:
        out.close()


def stop_all() -> None:
    for proc, out in _started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    _started.clear()
