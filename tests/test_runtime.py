from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.control.records import StatusFile
from appliance.control.runtime import (
    STALE_AFTER_S,
    clear_status,
    group_pids,
    log_tail,
    pid_alive,
    read_status,
    session_pids,
    status_path,
    stop_pids,
    tethered,
    write_status,
)

# Announces readiness on stdout so the test never races the handler installation.
IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def config(appliance_home: Path) -> ApplianceConfig:
    return load_config()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is killed by its pid and reaped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def sleeper(
    children: list[subprocess.Popen[bytes]], code: str = "import time; time.sleep(60)", **kw: bool
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, **kw)
    children.append(proc)
    return proc


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError("condition not met")


def test_status_round_trip_with_a_live_pid(config: ApplianceConfig, supervisor_pid: int) -> None:
    status = StatusFile(pid=supervisor_pid, phase="running", endpoint="http://127.0.0.1:8000/v1")

    write_status(config, status)
    read = read_status(config)

    assert read is not None
    assert read.model_copy(update={"updated_at": 0.0}) == status
    assert read.stale is False
    assert abs(read.updated_at - time.time()) < 60
    assert status_path(config) == config.run_dir / "appliance.json"
    assert [p.name for p in config.run_dir.iterdir()] == ["appliance.json"]


def test_old_status_is_marked_stale(config: ApplianceConfig, supervisor_pid: int) -> None:
    write_status(config, StatusFile(pid=supervisor_pid))
    data = json.loads(status_path(config).read_text())
    data["updated_at"] = time.time() - STALE_AFTER_S - 1
    status_path(config).write_text(json.dumps(data))

    read = read_status(config)

    assert read is not None
    assert read.stale is True


def test_status_of_a_dead_pid_is_none(
    config: ApplianceConfig, children: list[subprocess.Popen[bytes]]
) -> None:
    proc = sleeper(children, "pass")
    proc.wait(timeout=10)

    write_status(config, StatusFile(pid=proc.pid, phase="running"))

    assert read_status(config) is None


def test_status_of_a_live_pid_that_is_no_supervisor_is_none(config: ApplianceConfig) -> None:
    # A pid recycled by an unrelated process must never be taken for the appliance.
    write_status(config, StatusFile(pid=os.getpid(), phase="running"))
    assert read_status(config) is None


@pytest.mark.parametrize(
    "text", [None, "", "{not json", '{"phase": "running"}', "[]", '{"pid": "x"}', '{"pid": null}']
)
def test_missing_or_unreadable_status_is_none(config: ApplianceConfig, text: str | None) -> None:
    if text is not None:
        config.run_dir.mkdir(parents=True)
        status_path(config).write_text(text)
    assert read_status(config) is None


def test_clear_status(config: ApplianceConfig, supervisor_pid: int) -> None:
    clear_status(config)  # nothing there yet: no error
    write_status(config, StatusFile(pid=supervisor_pid))
    clear_status(config)
    assert not status_path(config).exists()
    assert read_status(config) is None


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert log_tail(log, lines=2) == "line 28\nline 29"
    assert log_tail(tmp_path / "missing.log") == ""


def test_pid_alive_for_this_process() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    assert not pid_alive(-1)


def test_pid_alive_for_a_reaped_child(children: list[subprocess.Popen[bytes]]) -> None:
    proc = sleeper(children, "pass")
    proc.wait(timeout=10)
    assert not pid_alive(proc.pid)


def test_pid_alive_for_a_zombie(children: list[subprocess.Popen[bytes]]) -> None:
    proc = sleeper(children)
    assert pid_alive(proc.pid)

    os.kill(proc.pid, signal.SIGKILL)
    # Not waited for yet, so it stays a zombie; poll() would reap it.
    stat = Path(f"/proc/{proc.pid}/stat")
    wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")

    assert not pid_alive(proc.pid)


def test_session_pids_finds_a_child_in_its_own_session(
    children: list[subprocess.Popen[bytes]],
) -> None:
    proc = sleeper(children, start_new_session=True)
    wait_until(lambda: session_pids(proc.pid) == [proc.pid])

    assert proc.pid not in session_pids(os.getsid(0))
    assert os.getpid() not in session_pids(proc.pid)


# A parent that starts a tethered child, prints its pid, and waits to be killed.
TETHERING_PARENT = (
    "import subprocess, sys, time\n"
    "from appliance.control.runtime import tethered\n"
    "child = subprocess.Popen(tethered(['sleep', '60']))\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_tethered_child_keeps_its_pid_and_dies_with_its_parent(
    children: list[subprocess.Popen[bytes]],
) -> None:
    parent = sleeper(children, TETHERING_PARENT)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    cmdline = Path(f"/proc/{child}/cmdline")
    # The same pid runs the program itself once the tether has exec'd it.
    wait_until(lambda: cmdline.read_bytes().split(b"\0")[0].endswith(b"sleep"))
    parent.kill()  # SIGKILL: nothing in the parent gets to clean up
    wait_until(lambda: not pid_alive(child))


def test_a_tethered_program_that_is_not_there_fails_as_popen_would() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-engine"):
        tethered(["no-such-engine", "--serve"])
    # Looked up on the PATH the child gets, not on this process's.
    with pytest.raises(FileNotFoundError):
        tethered(["sleep", "1"], env={"PATH": "/nonexistent"})


def test_group_pids_leaves_out_a_zombie_leader(children: list[subprocess.Popen[bytes]]) -> None:
    leader = sleeper(children, process_group=0)  # type: ignore[arg-type]
    wait_until(lambda: group_pids(leader.pid) == [leader.pid])
    os.kill(leader.pid, signal.SIGKILL)
    wait_until(lambda: group_pids(leader.pid) == [])
    os.killpg(leader.pid, 0)  # a signal still reaches the group: its zombie leader


def test_stop_pids_terminates_politely_when_it_can(
    children: list[subprocess.Popen[bytes]],
) -> None:
    proc = sleeper(children)

    assert stop_pids([proc.pid], timeout_s=10) == []
    assert not pid_alive(proc.pid)
    assert proc.wait(timeout=10) == -signal.SIGTERM


def test_stop_pids_kills_a_process_that_ignores_sigterm(
    children: list[subprocess.Popen[bytes]],
) -> None:
    stubborn = sleeper(children, IGNORES_SIGTERM)
    polite = sleeper(children)
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"

    killed = stop_pids([stubborn.pid, polite.pid], timeout_s=0.5)

    assert killed == [stubborn.pid]
    assert stubborn.wait(timeout=10) == -signal.SIGKILL
    assert polite.wait(timeout=10) == -signal.SIGTERM


def test_stop_pids_ignores_pids_that_are_already_gone(
    children: list[subprocess.Popen[bytes]],
) -> None:
    proc = sleeper(children, "pass")
    proc.wait(timeout=10)
    assert stop_pids([proc.pid], timeout_s=0.5) == []


def test_ray_always_runs_with_a_private_token(appliance_home: Path) -> None:
    from appliance.config import load_config
    from appliance.control.runtime import ray_token_path, supervisor_env

    config = load_config()
    env = supervisor_env(config)
    token = ray_token_path(config)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert token.stat().st_mode & 0o777 == 0o600
    first = token.read_text()
    assert len(first) == 64
    assert supervisor_env(config)["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert token.read_text() == first  # made once, then kept


def test_turning_ray_authentication_off_is_refused(
    appliance_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.config import load_config
    from appliance.control.runtime import supervisor_env
    from appliance.errors import ClusterError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ClusterError) as info:
        supervisor_env(load_config())
    assert "token authentication only" in str(info.value)
    assert "Unset RAY_AUTH_MODE" in str(info.value)
