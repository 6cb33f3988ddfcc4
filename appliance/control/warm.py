"""Warm start: on a CPU host, the supervisor starts a replica's engine while Ray starts,
and the replica adopts it instead of starting its own.

Why: on a small CPU host the engine's own start is most of `appliance up` (vLLM's CPU
build imports vLLM twice, in its API server and in the engine-core process its CPU
platform spawns, then loads the model and sizes the KV cache: about 25 s for
smollm2-135m-instruct on 2 cores), and Ray, Serve and the replica actor take another
10-15 s before a replica could begin it. Started together, the two overlap.

Only where the replica is sure to run on this host, with a command known in advance: a
local Ray (no `ray.address`), a CPU plan (a process, never a container), the first
replica of each model. Everything else starts cold, as before.

The handover, in `<run_dir>/warm/`:
- the supervisor starts the engine (its own process group, SIGTERM if the supervisor
  dies) and writes the offer `<model>.json` (0600: it holds the engine's API key);
- a replica builds the command it would run itself, on the offer's port, and claims the
  offer only if that command is the same, by renaming it to `<model>.<pid>.claimed`
  (rename is atomic: two replicas cannot both win; a stale offer loses nothing but time);
- the supervisor stops a warm engine that nobody claimed within `claim_timeout_s`, and
  one whose claiming replica's process is gone: the replica did not start it, so the
  kernel's parent-death signal cannot stop it for the replica (`WarmEngines.tick`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from appliance.config import ApplianceConfig
from appliance.control.launch import engine_start
from appliance.control.records import Deployment, Record, ReplicaSpec
from appliance.control.runtime import pid_alive, tethered
from appliance.engines.runner import EngineCommand
from appliance.logs import ensure_log_dir, popen_logged

log = logging.getLogger("appliance.supervisor")

WARM_REPLICA = "warm"  # the replica id in the warm engine's log and work directory names


class WarmOffer(Record):
    """A running engine, waiting for the replica it was started for."""

    model: str
    pid: int
    host: str
    port: int
    api_key: str | None
    argv: list[str]
    env: dict[str, str]  # the engine's own variables (the adapter's), not the inherited ones
    work_dir: str
    log_path: str
    started_at: float


def warm_dir(config: ApplianceConfig) -> Path:
    return config.run_dir / "warm"


def eligible(config: ApplianceConfig, dep: Deployment) -> bool:
    # A remote Ray may place the replica on any node; a GPU plan's replica learns its
    # GPUs from Ray, and usually runs in a container.
    return config.serve.warm_start and not config.ray.address and dep.plan.on_cpu


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class _Warm:
    offer: WarmOffer
    proc: subprocess.Popen[bytes]
    offered: Path


class WarmEngines:
    """The supervisor's side: start warm engines, and stop the ones nobody uses."""

    def __init__(self, config: ApplianceConfig, claim_timeout_s: float | None = None) -> None:
        self.config = config
        self.dir = warm_dir(config)
        self.claim_timeout_s = (
            claim_timeout_s if claim_timeout_s is not None else config.serve.warm_claim_timeout_s
        )
        self.engines: dict[str, _Warm] = {}

    def start(self, spec: ReplicaSpec) -> WarmOffer | None:
        """Start `spec`'s engine now, on a port of its own; None if it cannot start (the
        replica then starts it cold and reports why)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        host = spec.engine_host or "127.0.0.1"
        port = _free_port(host)
        work_dir = Path(spec.work_dir) / f"{spec.model}-{WARM_REPLICA}"
        start = engine_start(
            spec,
            host=host,
            port=port,
            gpu_ids=(),
            work_dir=work_dir,
            container="",
            base_env=os.environ,
            with_api_key=True,
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        for name, content in start.launch.files.items():
            (work_dir / name).write_text(content)
        log_dir = Path(spec.log_dir)
        ensure_log_dir(log_dir)
        log_path = log_dir / f"engine-{spec.model}-{WARM_REPLICA}.log"
        command = start.command
        try:
            proc = popen_logged(
                tethered(command.argv, command.env),
                log_path,
                header=f"$ {shlex.join(command.argv)}\n".encode(),
                env=command.env,
                process_group=0,
            )
        except OSError as exc:
            log.warning("no warm start for %s: %s: %s", spec.model, command.argv[0], exc.strerror)
            return None
        offer = WarmOffer(
            model=spec.model,
            pid=proc.pid,
            host=host,
            port=port,
            api_key=start.launch.api_key,
            argv=command.argv,
            env=dict(start.launch.env),
            work_dir=str(work_dir),
            log_path=str(log_path),
            started_at=time.time(),
        )
        offered = self.dir / f"{spec.model}.json"
        _write_private(offered, offer.model_dump_json())
        self.engines[spec.model] = _Warm(offer, proc, offered)
        log.info("started %s's engine warm (pid %d), while Ray starts", spec.model, proc.pid)
        return offer

    def start_all(self, deployments: list[Deployment], specs: dict[str, ReplicaSpec]) -> None:
        for dep in deployments:
            if eligible(self.config, dep) and dep.model in specs:
                try:
                    self.start(specs[dep.model])
                except Exception as exc:  # a warm start is only ever an optimisation
                    log.warning("no warm start for %s: %s", dep.model, exc)

    def tick(self) -> None:
        """Reap warm engines that exited; stop the unclaimed and the orphaned."""
        now = time.time()
        for model, warm in list(self.engines.items()):
            if warm.proc.poll() is not None:
                # Its engine core may outlive it (seen with vLLM after `kill -9`); the
                # group id stays reserved while any member lives.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(warm.proc.pid, signal.SIGKILL)
                self._forget(warm)
                continue
            if warm.offered.exists():
                if now - warm.offer.started_at < self.claim_timeout_s:
                    continue
                # Withdraw the offer first: a replica claiming it at this moment either
                # renamed it already (then it is claimed) or finds nothing.
                try:
                    os.rename(warm.offered, warm.offered.with_suffix(".withdrawn"))
                except FileNotFoundError:
                    continue
                log.info("stopping %s's warm engine: no replica claimed it", model)
                self._stop(warm)
                continue
            claimer = _claimer(self.dir, model, warm.offer.pid)
            if claimer is None or not pid_alive(claimer):
                log.info("stopping %s's warm engine: the replica that adopted it is gone", model)
                self._stop(warm)

    def stop_all(self) -> None:
        for warm in list(self.engines.values()):
            self._stop(warm)

    def _stop(self, warm: _Warm) -> None:
        pgid = warm.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            warm.proc.wait(timeout=10)
        # The engine's own children (vLLM's engine core) share its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            warm.proc.wait(timeout=5)
        self._forget(warm)

    def _forget(self, warm: _Warm) -> None:
        for path in self.dir.glob(f"{warm.offer.model}.*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.engines.pop(warm.offer.model, None)


def _claimed_name(model: str, engine_pid: int, claimer: int) -> str:
    return f"{model}.{engine_pid}.{claimer}.claimed"


def _claimer(directory: Path, model: str, engine_pid: int) -> int | None:
    for path in directory.glob(f"{model}.{engine_pid}.*.claimed"):
        with contextlib.suppress(ValueError):
            return int(path.name.rsplit(".", 2)[-2])
    return None


def read_offer(directory: Path, model: str) -> WarmOffer | None:
    """The waiting engine for `model`, if there is one and it still runs."""
    try:
        offer = WarmOffer.model_validate_json((directory / f"{model}.json").read_bytes())
    except (OSError, ValidationError):
        return None
    return offer if pid_alive(offer.pid) else None


def claim(directory: Path, offer: WarmOffer, command: EngineCommand, env: dict[str, str]) -> bool:
    """Take `offer` for this process if `command` (built on the offer's port) is what it
    runs; False when it differs or another replica took it first."""
    if command.argv != offer.argv or env != offer.env:
        log.warning(
            "not adopting %s's warm engine: it runs a different command; starting one", offer.model
        )
        return False
    try:
        os.rename(
            directory / f"{offer.model}.json",
            directory / _claimed_name(offer.model, offer.pid, os.getpid()),
        )
    except FileNotFoundError:
        return False
    return pid_alive(offer.pid)


class AdoptedProcess:
    """An engine this process did not start, with the part of Popen's interface the
    replica uses. Watched through a pidfd, which never names a later process that reuses
    the pid. Its exit status goes to its parent (the supervisor): `returncode` says only
    that it exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = os.pidfd_open(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._fd is not None and _readable(self._fd, 0):
            self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._fd is not None:
            if not _readable(self._fd, timeout):
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            self._exited()
        assert self.returncode is not None
        return self.returncode

    def _exited(self) -> None:
        self.returncode = EXITED_UNKNOWN
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # type: ignore[arg-type]


def _readable(fd: int, timeout: float | None) -> bool:
    # A pidfd reads as ready once its process has exited.
    return bool(select.select([fd], [], [], timeout)[0])


# What `AdoptedProcess.returncode` holds once the engine exited (its status is not ours).
EXITED_UNKNOWN = -255


def exit_text(returncode: int | None) -> str:
    if returncode == EXITED_UNKNOWN:
        return "exited"
    return f"exited with code {returncode}"
