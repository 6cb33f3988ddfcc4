"""The running appliance as seen from outside: its status file and its processes.

The supervisor rewrites `<home>/run/appliance.json` every second (atomically); the CLI
reads it for `status`, `up` and `down` without connecting to Ray. Every process the
appliance starts lives in the supervisor's session, so `down` can find leftovers by
session id and stop them by pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.control.records import StatusFile
from appliance.errors import ClusterError

STALE_AFTER_S = 15.0


def status_path(config: ApplianceConfig) -> Path:
    return config.run_dir / "appliance.json"


def write_status(config: ApplianceConfig, status: StatusFile) -> None:
    path = status_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(status.model_copy(update={"updated_at": time.time()}).file_text())
    os.replace(tmp, path)


def _status_file(config: ApplianceConfig) -> StatusFile | None:
    try:
        return StatusFile.model_validate_json(status_path(config).read_bytes())
    except (OSError, ValueError):  # missing, half-written by hand, or not a status
        return None


def last_supervisor_pid(config: ApplianceConfig) -> int | None:
    """The pid the status file names, whether or not that process still lives."""
    status = _status_file(config)
    return status.pid if status is not None else None


def read_status(config: ApplianceConfig) -> StatusFile | None:
    """The supervisor's last status, or None when no supervisor process is alive."""
    status = _status_file(config)
    if status is None or not is_supervisor(status.pid):
        return None
    stale = time.time() - status.updated_at > STALE_AFTER_S
    return status.model_copy(update={"stale": stale})


def clear_status(config: ApplianceConfig) -> None:
    with contextlib.suppress(FileNotFoundError):
        status_path(config).unlink()


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log (read from its end: logs grow to tens of megabytes)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def ray_token_path(config: ApplianceConfig) -> Path:
    return config.home_dir / "ray-auth-token"


def ensure_ray_token(config: ApplianceConfig) -> Path:
    """This appliance's Ray token file (0600), made on first use.

    Ray's default is one token per user (~/.ray/auth_token, 0644) shared by every cluster
    that user starts; the appliance's own file keeps other clusters' holders out. On
    installed hosts the installer writes (and rotates) it on every node.
    """
    path = ray_token_path(config)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def supervisor_env(config: ApplianceConfig) -> dict[str, str]:
    """Environment for the supervisor and everything it starts (read when ray is imported).

    Ray runs with token authentication, always: its ports accept pickled calls, so anyone
    who could reach them unauthenticated could run code as the appliance's user.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise ClusterError(
            f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} is set, but the appliance runs Ray "
            "with token authentication only (without it, whoever reaches a Ray port can run "
            "code as this user)",
            hint="Unset RAY_AUTH_MODE (the appliance sets it to token itself).",
        )
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(ensure_ray_token(config)),
    }
    if not config.ray.address:
        # Single-machine Ray: nodes advertise loopback addresses, so the gateway and the
        # engines are reached over 127.0.0.1 and nothing is offered to other hosts.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


_PR_SET_PDEATHSIG = 1


# Run before a child's own program: it gets SIGTERM when its parent dies, however it dies
# (kill -9 included), and does not start at all if the parent is already gone. This was a
# Popen preexec_fn, but a preexec_fn makes Popen fork() instead of vfork(): in a process
# with Ray's gRPC threads, gRPC's fork handlers ran in the child, and gRPC aborted on the
# descriptors Popen then closed (seen in CI: an engine that died before its exec with
# "epoll_wait error: Bad file descriptor" and SIGABRT). A tiny interpreter that execs keeps
# the pid, and Popen can vfork.
_TETHER = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGTERM)})\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def tethered(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """`argv`, started so that it dies with this process (see _TETHER). A program that
    is not there raises FileNotFoundError here, as Popen itself would."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    program = shutil.which(argv[0], path=path)
    if program is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    return [sys.executable, "-I", "-S", "-c", _TETHER, str(os.getpid()), program, *argv[1:]]


def die_with_parent_now(parent: int) -> None:
    """In a forked child: SIGTERM when `parent` dies; exit at once if it already has."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits for its parent to reap it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def is_supervisor(pid: int) -> bool:
    """The pid is alive and is an appliance supervisor (not a recycled pid)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"appliance.control.supervisor" in cmdline


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (Linux /proc)."""
    return _live_pids(3, sid)


def group_pids(pgid: int) -> list[int]:
    """Live processes of the process group `pgid`: zombies left out, which a signal
    to the group still reaches (an engine's exited leader waiting for its parent)."""
    return _live_pids(2, pgid)


def _live_pids(field: int, value: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp session ...
        if int(fields[field]) == value and fields[0] != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def stop_pids(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGTERM, wait, then SIGKILL whatever is left; returns the pids that were killed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed
