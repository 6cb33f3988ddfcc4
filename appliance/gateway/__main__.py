"""`python -m appliance.gateway`: the gateway process (the supervisor starts it).

--ray-address ADDR       read the replica table from the appliance's Ray cluster
--static-replica M=URL   serve model M from the engine at URL (repeatable; no Ray)
--no-auth                accept requests without an API key (benchmarks, debugging)

Model records (engine, context length, max_num_seqs) come from the state file and
tokenizers from the model store, with either replica source.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from appliance.burst import Burst
from appliance.burst.spend import SharedHolds
from appliance.catalog import ModelEntry, load_catalog
from appliance.config import ApplianceConfig, GatewayConfig, load_config
from appliance.control.runtime import die_with_parent_now
from appliance.errors import ApplianceError
from appliance.gateway import INSTANCE_ENV, WORKER_ENV
from appliance.gateway.access import AccessLog
from appliance.gateway.app import GatewaySettings, create_app
from appliance.gateway.auth import KeyChecker
from appliance.gateway.deployments import DeploymentBook
from appliance.gateway.limits import SharedLimits
from appliance.gateway.metrics import GatewayMetrics, mark_dead, prepare_multiprocess_dir
from appliance.gateway.overflow import Overflow, shares_at
from appliance.gateway.replicas import (
    RayRegistrySource,
    ReplicaTable,
    StaticSource,
    shared_counts,
    shared_record,
)
from appliance.gateway.server import bind, bound_address, guarded_protocol
from appliance.gateway.shared import WORKERS_MAX, SharedTable
from appliance.ledger import Mover, Spool
from appliance.state import State

log = logging.getLogger("appliance.gateway")


def _pair(text: str) -> tuple[str, str]:
    model, sep, url = text.partition("=")
    if not sep or not model or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected MODEL=http://host:port, got {text!r}")
    return model, url


def _gateway_config(base: GatewayConfig, host: str | None, port: int | None) -> GatewayConfig:
    """The [gateway] section with command-line overrides, validated like the file."""
    data = base.model_dump()
    if host is not None:
        data["host"] = host
    if port is not None:
        data["port"] = port
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ApplianceError(f"invalid gateway settings: {messages}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="appliance-gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--host", default=None, help="override gateway.host")
    parser.add_argument("--port", type=int, default=None, help="override gateway.port")
    parser.add_argument(
        "--workers", type=int, default=None, help="override gateway.workers (processes)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ray-address")
    source.add_argument("--static-replica", type=_pair, action="append")
    parser.add_argument("--no-auth", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        gc = _gateway_config(config.gateway, args.host, args.port)
        workers = args.workers or gc.worker_count
        if not 1 <= workers <= WORKERS_MAX:
            raise ApplianceError(f"--workers must be between 1 and {WORKERS_MAX}")
        # Bound here first: "address in use" is reported before any worker starts.
        sock = bind(gc.host, gc.port, reuse_port=workers > 1)
    except ApplianceError as exc:
        parser.exit(2, f"error: {exc}\n")
    if not gc.is_loopback and not gc.tls_cert:
        log.warning(
            "serving plain HTTP on %s:%d, reachable from other machines "
            "(gateway.allow_insecure_http = true): API keys and prompts cross the network "
            "unencrypted; set gateway.tls_cert and tls_key",
            *bound_address(sock),
        )
    # Before any worker counts anything: every worker's metrics go to files there.
    prepare_multiprocess_dir(config.run_dir / "gateway-metrics")
    if workers == 1:
        sys.exit(_serve(args, config, gc, sock, 0))
    sys.exit(Workers(args, config, gc, sock, workers).run())


def _serve(
    args: argparse.Namespace,
    config: ApplianceConfig,
    gc: GatewayConfig,
    sock: socket.socket,
    worker: int,
    workers: int = 1,
) -> int:
    """One gateway worker: the app on `sock` until it is told to stop; its exit code."""
    os.environ[WORKER_ENV] = str(worker)
    try:
        catalog = load_catalog(config.catalog)
    except ApplianceError as exc:
        log.error("%s", exc)
        return 2
    host, port = bound_address(sock)
    counts = shared_counts(config.run_dir / "gateway-replicas", worker)
    table = ReplicaTable(counts, gc.routing)
    src: StaticSource | RayRegistrySource
    if args.static_replica:
        src = StaticSource(table, args.static_replica, gc.refresh_interval_s)
    else:
        src = RayRegistrySource(
            table, args.ray_address, gc.refresh_interval_s, config.serve.stale_after_s
        )
    state = State(config.state_db)
    keys = KeyChecker(None)
    if gc.require_api_key and not args.no_auth:
        keys = KeyChecker(state.key_records, state.keys_version)

    def entries(model: str) -> ModelEntry | None:
        return catalog.get(model) if model in catalog else None

    book = DeploymentBook(state.deployments, config.store_dir, entries=entries)
    settings = GatewaySettings(
        connect_timeout_s=gc.connect_timeout_s,
        request_timeout_s=gc.request_timeout_s,
        retry_after_s=gc.retry_after_s,
        cold_start_timeout_s=gc.cold_start_timeout_s,
        limits=gc.limits,
        instance=os.environ.get(INSTANCE_ENV, ""),
        listen=f"{gc.scheme}://{host}:{port}",
    )
    quota = SharedLimits(config.run_dir / "gateway-limits", worker)
    spool = Spool(config.home_dir / "ledger", f"gateway-{worker}")
    metrics = GatewayMetrics(table, config.governance.prices)
    overflow = None
    if config.burst.enabled:
        try:
            burst = Burst(
                config.burst, holds=SharedHolds(config.run_dir / "gateway-burst-spend", worker)
            )
        except ApplianceError as exc:  # a credentials file that is missing or not private
            log.error("%s", exc)
            return 2
        overflow = Overflow(
            burst,
            table,
            spend=state.cloud_spend,
            shares=shares_at(config.run_dir / "gateway-burst-share", worker),
            on_status=metrics.providers,
        )
    mover = Mover(spool, state)
    mover.start()

    def stop() -> None:
        src.stop()
        mover.stop()

    app = create_app(
        table,
        keys,
        settings,
        on_shutdown=stop,
        book=book,
        quota=quota,
        spool=spool,
        heartbeat=counts.table.beat,
        metrics=metrics,
        access=AccessLog(config.log_dir / "access.log"),
        overflow=overflow,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="uvloop",
            http=guarded_protocol(gc.limits, gc.retry_after_s, counts, workers, metrics.refused),
            access_log=False,
            server_header=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=int(max(1, gc.limits.keepalive_timeout_s)),
            ssl_certfile=str(gc.tls_cert) if gc.tls_cert else None,
            ssl_keyfile=str(gc.tls_key) if gc.tls_key else None,
        )
    )
    log.info("gateway worker %d listening on %s://%s:%d", worker, gc.scheme, host, port)
    server.run(sockets=[sock])
    return 0 if server.started else 3


class Workers:
    """N gateway processes on one port (SO_REUSEPORT: the kernel spreads connections
    over them). This parent only starts them, restarts one that exits or whose event
    loop stops beating (a hung worker: `gateway.watchdog_s`), and stops them all on
    SIGTERM. Workers die with it (PR_SET_PDEATHSIG)."""

    START_GRACE_S = 60.0  # joining Ray and reading the state file before the first beat

    def __init__(
        self,
        args: argparse.Namespace,
        config: ApplianceConfig,
        gc: GatewayConfig,
        sock: socket.socket,
        workers: int,
    ) -> None:
        self.args, self.config, self.gc, self.workers = args, config, gc, workers
        self.address = (gc.host, gc.port)
        sock.close()  # each worker binds its own, in the same SO_REUSEPORT group
        self.pids: dict[int, int] = {}  # worker index -> pid
        self.started: dict[int, float] = {}
        self.restarts: dict[int, int] = {}
        self.due: dict[int, float] = {}  # worker index -> when to start it again
        self.stopping = False
        self.kill_at = float("inf")

    def _spawn(self, index: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                die_with_parent_now(parent)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                sock = bind(*self.address, reuse_port=True)
                code = _serve(self.args, self.config, self.gc, sock, index, self.workers)
            except BaseException:
                log.exception("gateway worker %d failed", index)
            finally:
                os._exit(code)
        self.pids[index] = pid
        self.started[index] = time.monotonic()
        log.info("gateway worker %d started, pid %d", index, pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop())
        signal.signal(signal.SIGINT, lambda *_: self._stop())
        for index in range(self.workers):
            self._spawn(index)
        beats = SharedTable(self.config.run_dir / "gateway-replicas", shared_record(), 4096, 0)
        while self.pids or self.due:
            time.sleep(0.5)
            for index, at in list(self.due.items()):
                if self.stopping:
                    self.due.clear()
                elif time.monotonic() >= at:
                    del self.due[index]
                    self._spawn(index)
            if self.stopping and time.monotonic() > self.kill_at:
                for pid in self.pids.values():  # a hung worker ignores SIGTERM
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for index, pid in list(self.pids.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self.pids[index]
                    mark_dead(pid)
                    code = os.waitstatus_to_exitcode(status)
                    if self.stopping:
                        continue
                    if code == 2:  # a configuration error: every restart would fail too
                        self._stop()
                        return 2
                    self._restart(index, f"exited with code {code}")
                elif not self.stopping:
                    self._watch(index, pid, beats)
        return 0

    def _watch(self, index: int, pid: int, beats: SharedTable) -> None:
        now = time.monotonic()
        beat = beats.heartbeats()[index]
        started = self.started[index]
        # Before its first beat a worker has START_GRACE_S; after it, watchdog_s.
        limit = self.gc.watchdog_s if beat >= started else self.START_GRACE_S
        if now - max(beat, started) > limit:
            log.error("gateway worker %d (pid %d) stopped beating; killing it", index, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _restart(self, index: int, why: str) -> None:
        count = self.restarts.get(index, 0) + 1
        if time.monotonic() - self.started[index] > 60:
            count = 1  # it ran a while: a fresh failure
        self.restarts[index] = count
        delay = min(30.0, 2.0 ** (count - 1))
        log.error("gateway worker %d %s; starting it again in %.0fs", index, why, delay)
        # Not a sleep here: the other workers' watchdog and exits keep being seen meanwhile.
        self.due[index] = time.monotonic() + delay

    def _stop(self) -> None:
        self.stopping = True
        self.kill_at = time.monotonic() + 15
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
