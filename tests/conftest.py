"""Shared test helpers: free ports, processes stopped by their own pid, HTTP waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from appliance.control.records import ReplicaState
from appliance.control.runtime import log_tail

REPO_ROOT = Path(__file__).resolve().parent.parent
_engine_install: threading.Thread | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The installer tests last: their downloads (a Debian root, the wheelhouse: minutes
    of network on a fresh machine) then overlap every test before them."""
    items.sort(key=lambda item: item.get_closest_marker("installer") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the downloads that selected tests will wait for, in the background, while
    the tests before them run: the installer tests' Debian root and wheelhouse, and vLLM's
    CPU build for the end-to-end tests (minutes, once per machine; the first `appliance
    up` waits on the same lock instead of starting the install itself)."""
    if any(item.get_closest_marker("installer") for item in session.items):
        from tests.installer.testhosts import start_downloads

        start_downloads()
    if any(item.get_closest_marker("e2e") for item in session.items):
        _start_engine_install()
    if any(item.nodeid.endswith("test_lint[mypy]") for item in session.items):
        from tests import background

        root = Path(__file__).resolve().parent.parent
        background.start("mypy", [sys.executable, "-m", "mypy"], root)


def _start_engine_install() -> None:
    global _engine_install
    from appliance.config import EnginesConfig
    from appliance.engines.cpuenv import CpuEngineEnv

    env = CpuEngineEnv.of(EnginesConfig())
    if env.ready:
        return

    def install() -> None:
        try:
            env.ensure()
        except Exception as exc:  # the first `up` reports it, with its log
            print(f"\nbackground install of vLLM's CPU build failed: {exc}", file=sys.stderr)

    _engine_install = threading.Thread(target=install, name="engine-install", daemon=True)
    _engine_install.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """A failed test that ran against a real appliance shows the end of its supervisor
    and gateway logs: on CI they are all there is to learn from (the homes are gone)."""
    report: pytest.TestReport = yield
    if report.failed and call.when == "call":
        for value in getattr(item, "funcargs", {}).values():
            found = value[0] if isinstance(value, tuple) and value else value
            # By name: test modules import this file as tests.conftest, pytest as conftest.
            if any(c.__name__ == "ApplianceUnderTest" for c in type(found).__mro__):
                for name in ("supervisor.log", "gateway.log"):
                    text = log_tail(found.home / "logs" / name, 60)
                    report.sections.append((f"{name} (last 60 lines)", text or "(none)"))
                break
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _engine_install is not None:
        _engine_install.join()  # never leave pip running behind the session
    if "tests.background" in sys.modules:
        sys.modules["tests.background"].stop_all()
    if "tests.installer.testhosts" in sys.modules:
        sys.modules["tests.installer.testhosts"].finish_downloads()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


@dataclass(frozen=True)
class Result:
    """A CLI command's outcome, as tests read it."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        # rich wraps at the console width, so compare with whitespace collapsed.
        return " ".join((self.out + "\n" + self.err).split())

    def json(self) -> Any:
        return json.loads(self.out)


class Processes:
    """Starts processes for a test and stops each one by its own pid afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"proc-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.procs.append(proc)
        return proc

    def fake_engine(
        self, model: str, tokens: int, delay_ms: int, port: int | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """The fake engine serving `model` (`tokens` per answer, `delay_ms` apart), once it
        answers /health; with its base URL."""
        port = port or free_port()
        proc = self.start(
            "-m", "appliance.testing.fake_engine", "--port", str(port), "--model", model,
            "--tokens", str(tokens), "--delay-ms", str(delay_ms),
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc=proc)
        return proc, url

    def gateway(
        self,
        config: Path,
        port: int,
        replicas: dict[str, str],
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """The gateway with `config`, serving each model from the engine at its URL
        (--static-replica), once it answers /healthz on `port`."""
        pairs = [
            arg for model, url in replicas.items() for arg in ("--static-replica", f"{model}={url}")
        ]
        proc = self.start("-m", "appliance.gateway", "--config", str(config), *pairs, env=env)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def replica_state(replica_id: str = "r1", **fields: Any) -> ReplicaState:
    """A replica as the registry reports it (routable unless told otherwise)."""
    values: dict[str, Any] = {
        "replica_id": replica_id,
        "model": "tiny-random-llama",
        "engine": "vllm",
        "url": "http://127.0.0.1:9",
        "engine_model": "tiny-random-llama",
        "node": "127.0.0.1",
        "healthy": True,
        "fresh": True,
    }
    return ReplicaState.model_validate({**values, **fields})


@pytest.fixture
def supervisor_pid() -> Iterator[int]:
    """A process that passes for a supervisor (its argv names the module); no Ray behind it."""
    from appliance.control.runtime import is_supervisor

    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "appliance.control.supervisor"]
    )
    # Popen returns once the kernel wakes the (v)forking parent, which can be a moment
    # before the child's new command line is visible in /proc (seen: 6 spawns in 300).
    deadline = time.monotonic() + 10
    while not is_supervisor(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def appliance_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated state directory and no config file, for code under test."""
    home = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def entry_points_dist(root: Path) -> Path:
    """A directory that, on sys.path, makes importlib.metadata find the entry points
    pyproject.toml declares, as an install of the appliance's wheel would: the tests run
    from a source tree (PYTHONPATH), whose own entry points no installed metadata lists."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    info = root / "entry-points" / "appliance_source_tree-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    metadata = "Metadata-Version: 2.1\nName: appliance-source-tree\nVersion: 0\n"
    (info / "METADATA").write_text(metadata)
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info.parent


def vllm_stand_in(root: Path) -> Path:
    """An `engines.vllm.command` that runs the fake engine, which takes the `-m
    vllm.entrypoints.openai.api_server ...` it is given as vLLM's command line, with the
    appliance's entry points visible to it as in the engine image."""
    dist = entry_points_dist(root)
    stand_in = root / "fake-vllm"
    # As vLLM's Python: `-m vllm.entrypoints...` is the engine; anything else runs as
    # Python does (Ray starts the engine's workers with it, ray_workers_run), marked so
    # that a worker can tell it runs in the engine's interpreter.
    stand_in.write_text(
        f'#!/bin/sh\nexport PYTHONPATH="{dist}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        'if [ "$1" = "-m" ] && [ "$2" = "vllm.entrypoints.openai.api_server" ]; then\n'
        f'  exec {sys.executable} -m appliance.testing.fake_engine "$@"\n'
        "fi\n"
        f'FAKE_VLLM_PYTHON=1 exec {sys.executable} "$@"\n'
    )
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    return stand_in


def install_unread_weights(home: Path, model: str) -> None:
    """Weights a stand-in engine never reads, installed through the store like any model's."""
    from appliance.store import Store

    Store(home / "models").install(
        model, lambda d: (d / "config.json").write_text("{}"), source="test"
    )


class ApplianceUnderTest:
    """A real appliance in a temp dir, driven through its CLI as an admin would."""

    SERVE = "[serve]\nhealth_check_period_s = 1.0\nreport_interval_s = 0.5\n"

    def __init__(self, root: Path, extra_config: str = "", gateway_config: str = "") -> None:
        self.home = root / "home"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.config = root / "appliance.toml"
        self.config.write_text(
            f'home = "{self.home}"\n[gateway]\nport = {self.port}\n{gateway_config}'
            f"{self.SERVE}{extra_config}"
        )

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        return subprocess.run(
            [sys.executable, "-m", "appliance", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))

    @property
    def key(self) -> str:
        return (self.home / "api-key").read_text().strip()


def package_index() -> str:
    """The index pip uses here: PIP_INDEX_URL, else PyPI (a pip.conf index is not read)."""
    return os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"


def reachable(url: str) -> bool:
    """A TCP connection to the URL's host and port opens within 3 s."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=3).close()
    except OSError:
        return False
    return True
