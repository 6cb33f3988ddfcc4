"""One model replica: a Ray Serve replica that owns one engine process.

The replica reserves the GPUs its plan needs (Ray assigns them), starts the engine on a
free port with exactly those devices visible, waits until it answers a real request,
then publishes its URL and load to the registry. Serve asks `check_health` periodically;
a dead or silent engine fails it and Serve replaces the replica. Requests never pass
through here: the gateway talks to the engine over plain HTTP.

A replica whose pipeline stages span nodes runs in a placement group of one bundle per
GPU (the supervisor asks Serve for it; the first bundle also holds the replica's CPUs).
It holds no GPUs itself; it decides which bundle each of vLLM's ranks takes
(`rank_layout`), names the group and those bundles to its engine
(APPLIANCE_PLACEMENT_GROUP, which appliance/vllm_plugin.py turns into the group vLLM's Ray
executor takes, and VLLM_RAY_BUNDLE_INDICES), reports where each rank runs (`ranks`), and
fails its health check as soon as the group loses a node, whatever the engine notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import ray
from ray import serve

from appliance.control import NAMESPACE, REGISTRY_NAME
from appliance.control.launch import EngineStart, engine_start
from appliance.control.records import Rank, ReplicaInfo, ReplicaSpec
from appliance.control.runtime import group_pids, log_tail, tethered
from appliance.control.warm import AdoptedProcess, WarmOffer, claim, exit_text, read_offer
from appliance.engines import EngineLaunch, EngineLoad
from appliance.engines.runner import container_name
from appliance.errors import EngineError
from appliance.logs import ensure_log_dir, popen_logged
from appliance.store import Store


def _bind_serve_grpc_to(host: str) -> None:
    """Ray Serve (2.60) starts each replica's inter-deployment gRPC server on [::]:0, every
    interface, hard-coded. The appliance never calls replicas through Serve handles, so
    the server goes on the replica's own address instead: loopback in the embedded
    default, the node's cluster address on installed hosts (where the firewall admits
    cluster peers only). Runs in the replica's process, before Serve starts that server.
    """
    from ray.serve._private import replica as serve_replica

    original = serve_replica.add_port_to_grpc_server
    if getattr(original, "appliance_bound", False):
        return

    def bound(server: Any, address: str) -> int:
        if address == "[::]:0":
            address = f"{host}:0"
        return int(original(server, address))

    bound.appliance_bound = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = bound


def rank_layout(group: Any, tensor_parallel: int, driver_node_id: str) -> list[Rank]:
    """Which bundle of the replica's placement group each of vLLM's ranks takes.

    The group holds one {"GPU": 1} bundle per rank (vLLM refuses bundles of more), placed
    by Ray's PACK strategy, which says nothing about which bundles share a node. Ranks
    are ordered as vLLM's Ray executor orders bundles when given none
    (`get_bundles_sorted_by_node`): the replica's node first, then by node id, bundle
    index inside a node. vLLM's rank is stage * tensor_parallel + TP rank, so every
    tensor-parallel group stays inside one node exactly when each node holds a multiple of
    tensor_parallel bundles; a group placed otherwise is refused (Serve then starts the
    replica again, in a new group) rather than run with NCCL between hosts.
    """
    from ray.util import placement_group_table

    from appliance.placement import Cluster

    table = placement_group_table(group)
    names = {n.node_id: n.name for n in Cluster.from_ray(ray.nodes()).nodes}
    bundles: dict[int, dict[str, float]] = table["bundles"]
    where: dict[int, str] = table["bundles_to_node_id"]
    too_big = [i for i, b in bundles.items() if b.get("GPU", 0) > 1]
    if too_big:
        raise EngineError(
            f"bundles {too_big} of this replica's placement group hold more than one GPU, "
            "which vLLM's Ray executor refuses",
            hint="The supervisor asks for one bundle per GPU; restart it (`appliance up`) "
            "so that Serve deploys the model with its current bundles.",
        )
    gpu_bundles = sorted(i for i, b in bundles.items() if b.get("GPU", 0))
    per_node = Counter(where.get(i, "") for i in gpu_bundles)
    split = {node: count for node, count in per_node.items() if count % tensor_parallel}
    if split:
        counts = ", ".join(f"{names.get(n, n)}: {c}" for n, c in sorted(per_node.items()))
        raise EngineError(
            f"Ray placed this replica's {len(gpu_bundles)} GPUs as {counts}: a "
            f"tensor-parallel group of {tensor_parallel} would span nodes",
            hint="Serve starts the replica again in a new placement group; if this "
            "repeats, free whole blocks of GPUs on the nodes (`appliance status`).",
        )
    order = sorted(gpu_bundles, key=lambda i: (where.get(i) != driver_node_id, where.get(i, "")))
    ranks = []
    for rank, bundle in enumerate(order):
        node_id = where.get(bundle, "")
        ranks.append(
            Rank(
                rank=rank,
                stage=rank // tensor_parallel,
                node=names.get(node_id, node_id),
                node_id=node_id,
                bundle=bundle,
            )
        )
    return ranks


def group_problem(group: Any) -> str | None:
    """None while every bundle of the group is on a live node, else what is lost."""
    from ray.util import placement_group_table

    state = placement_group_table(group).get("state")
    if state == "CREATED":
        return None
    return (
        f"its placement group is {state}: a node holding one of its pipeline stages is "
        "gone, and the engine cannot run without it"
    )


# Scale-down and shutdown: how long a replica waits for its engine's requests in flight
# (below the deployment's graceful_shutdown_timeout_s, 30 s), and how long at least (the
# gateway's next refresh of the replica table, 0.5 s by default, and the hop to it).
DRAIN_S = 25.0
DRAIN_SETTLE_S = 1.0


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EngineReplica:
    # Serve awaits an async constructor, so the engine starts before traffic arrives.
    async def __init__(self, spec: dict[str, Any]) -> None:  # type: ignore[misc]
        self.spec = ReplicaSpec.model_validate(spec)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name() or ""
        self.gpu_ids = tuple(str(int(g)) for g in ray.get_gpu_ids())
        self.host = self.spec.engine_host or ray.util.get_node_ip_address()
        # Stages on several nodes: the group Serve reserved, one bundle per GPU.
        self.group = ray.util.get_current_placement_group() if self.spec.plan.spans_nodes else None
        self.ranks = (
            rank_layout(
                self.group,
                self.spec.plan.tensor_parallel,
                ray.get_runtime_context().get_node_id(),
            )
            if self.group is not None
            else []
        )
        _bind_serve_grpc_to(self.host)
        # Cheap, and it catches a truncated or rewritten file before an engine loads it.
        weights = Path(self.spec.weights)
        Store(weights.parent).check_files(weights.name)
        warm = Path(self.spec.warm_dir) if self.spec.warm_dir else None
        offer = read_offer(warm, self.spec.model) if warm is not None else None
        start = self._engine_start(offer)
        if (
            offer is not None
            and warm is not None
            and not claim(warm, offer, start.command, dict(start.launch.env))
        ):
            offer = None
            start = self._engine_start(None)
        self.adapter = start.adapter
        self.launch: EngineLaunch = start.launch
        self.command = start.command
        self._auth = (
            {"authorization": f"Bearer {self.launch.api_key}"} if self.launch.api_key else {}
        )
        self.warm_start = offer is not None
        self.proc: subprocess.Popen[bytes] | AdoptedProcess
        if offer is not None:
            # The supervisor started this engine while Ray started (control/warm.py).
            self.log_path = Path(offer.log_path)
            self.started_at = offer.started_at
            self.proc = AdoptedProcess(offer.pid)
        else:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            for name, content in self.launch.files.items():
                (self.work_dir / name).write_text(content)
            log_dir = Path(self.spec.log_dir)
            ensure_log_dir(log_dir)
            self.log_path = log_dir / f"engine-{self.spec.model}-{self.replica_id}.log"
            self.started_at = time.time()
            self.proc = self._start_engine()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._registry: Any = None
        self._stopped = False
        # Why the engine is not fit for traffic; None while it is.
        self.problem: str | None = None
        self._probe_problem: str | None = None
        self._failed_check = False  # the last health check Serve made failed
        self._prober: asyncio.Task[None] | None = None
        try:
            await self._wait_ready()
        except BaseException:
            await self.session.close()
            self._stop_engine()
            raise
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    def _engine_start(self, offer: WarmOffer | None) -> EngineStart:
        """The engine this replica runs: on a fresh port, or on a warm engine's."""
        self.port = offer.port if offer is not None else free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        self.work_dir = (
            Path(offer.work_dir)
            if offer is not None
            else Path(self.spec.work_dir) / f"{self.spec.model}-{self.replica_id}"
        )
        # The engine gets a key when it can require one, and only the gateway learns it
        # (from the registry): the engine's API is not open to whoever reaches its address.
        return engine_start(
            self.spec,
            host=self.host,
            port=self.port,
            gpu_ids=self.gpu_ids,
            work_dir=self.work_dir,
            container=container_name(self.spec.model, self.replica_id),
            base_env=os.environ,
            with_api_key=True,
            api_key=offer.api_key if offer is not None else None,
            placement_group=self.group.id.hex() if self.group is not None else None,
            bundle_indices=tuple(r.bundle for r in self.ranks),
        )

    def _start_engine(self) -> subprocess.Popen[bytes]:
        try:
            return popen_logged(
                # If the replica's process dies without cleaning up, the engine stops too.
                tethered(self.command.argv, self.command.env),
                self.log_path,
                header=f"$ {shlex.join(self.command.argv)}\n".encode(),
                env=self.command.env,
                process_group=0,
            )
        except OSError as exc:
            program = self.command.argv[0]
            if self.spec.plan.on_cpu:
                hint = (
                    "`appliance up` installs vLLM's CPU build before it starts the replicas; "
                    "run it again, or set engines.vllm.command in appliance.toml to the Python "
                    "of a virtualenv that has vLLM."
                )
            else:
                hint = (
                    f"Install it in its own virtualenv and set engines.{self.spec.engine}"
                    ".command in appliance.toml, or run engines in containers (engines.runner "
                    '= "container").'
                )
            raise EngineError(
                f"cannot start the {self.spec.engine} engine: {program}: {exc.strerror}",
                hint=hint,
            ) from None

    def _dead_error(self) -> EngineError:
        return EngineError(
            f"engine for {self.spec.model} {exit_text(self.proc.returncode)}",
            hint=f"Engine log {self.log_path}:\n{log_tail(self.log_path)}",
        )

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        healthy = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._dead_error()
            try:
                if not healthy:
                    async with self.session.get(self.url + self.launch.health_path) as resp:
                        healthy = resp.status == 200
                if healthy and self.launch.warmup is None:
                    return
                if healthy and self.launch.warmup is not None:
                    path, body = self.launch.warmup
                    async with self.session.post(
                        self.url + path, json=body, headers=self._auth
                    ) as resp:
                        await resp.read()
                        if resp.status == 200:
                            return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.25)
        raise EngineError(
            f"engine for {self.spec.model} was not ready after {self.spec.start_timeout_s:.0f}s",
            hint=f"Raise serve.engine_start_timeout_s or read the engine log {self.log_path}:\n"
            f"{log_tail(self.log_path)}",
        )

    async def _load(self) -> EngineLoad | None:
        if self.adapter.metrics_path is None:
            return None
        try:
            async with self.session.get(self.url + self.adapter.metrics_path) as resp:
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError):
            return None
        return self.adapter.parse_load(text)

    def info(self, healthy: bool, load: EngineLoad | None = None) -> ReplicaInfo:
        return ReplicaInfo(
            replica_id=self.replica_id,
            model=self.spec.model,
            engine=self.spec.engine,
            url=self.url,
            engine_model=self.launch.engine_model,
            response_model=self.launch.response_model,
            node=self.host,
            pid=self.proc.pid,
            gpu_ids=self.gpu_ids,
            argv=self.command.argv,
            healthy=healthy,
            problem=self.problem,
            engine_key=self.launch.api_key,
            load=load,
            started_at=self.started_at,
            log=str(self.log_path),
            warm_start=self.warm_start,
            ranks=self.ranks,
            actor=self.actor_name,
        )

    def _registry_handle(self) -> Any:
        if self._registry is None:
            self._registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        return self._registry

    def _publish(self, info: ReplicaInfo) -> None:
        try:
            self._registry_handle().report.remote(info.model_dump())
        except Exception:  # registry restarting: look it up again next time
            self._registry = None

    async def _health(self) -> str | None:
        """None when the engine is alive and answers its health URL, else why not."""
        if self.proc.poll() is not None:
            return f"engine {exit_text(self.proc.returncode)}"
        if self.group is not None:
            # An engine whose workers died with their node can hang instead of exiting.
            lost = await asyncio.get_running_loop().run_in_executor(None, group_problem, self.group)
            if lost is not None:
                return lost
        try:
            async with self.session.get(
                self.url + self.launch.health_path, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status != 200:
                    return f"engine health check answered {resp.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            return f"engine health check failed: {exc!r}"
        return None

    async def _generation_probe(self) -> str | None:
        """None when the engine answers one real one-token request in time, else why not.

        An engine whose generation loop died or wedged on some request can still answer
        its health URL; only a request shows it.
        """
        assert self.launch.warmup is not None
        path, body = self.launch.warmup
        try:
            async with self.session.post(
                self.url + path,
                json=body,
                headers=self._auth,
                timeout=aiohttp.ClientTimeout(total=self.spec.probe_timeout_s),
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    return f"engine answered a one-token probe request with {resp.status}"
        except TimeoutError:
            return (
                f"engine did not answer a one-token probe request within "
                f"{self.spec.probe_timeout_s:g}s (wedged?)"
            )
        except aiohttp.ClientError as exc:
            return f"engine failed a one-token probe request: {exc!r}"
        return None

    async def _probe_loop(self) -> None:
        # Apart from the report loop, so a slow probe never delays the reports.
        while not self._stopped and self.proc.poll() is None:
            await asyncio.sleep(self.spec.probe_interval_s)
            self._probe_problem = await self._generation_probe()

    async def _report_loop(self) -> None:
        if self.launch.warmup is not None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop())
        while not self._stopped:
            problem = await self._health() or self._probe_problem
            if problem != self.problem:
                print(f"replica {self.replica_id}: {problem or 'engine healthy again'}", flush=True)
            self.problem = problem
            alive = self.proc.poll() is None
            load = await self._load() if problem is None else None
            self._publish(self.info(problem is None, load))
            if not alive:
                # What the dead engine left in its group stops now, not at replacement.
                await asyncio.get_running_loop().run_in_executor(None, self._stop_engine)
                return  # Serve's health check replaces this replica
            await asyncio.sleep(self.spec.report_interval_s)

    async def check_health(self) -> None:
        # Serve replaces a replica whose checks fail in a row: one that is stopped after
        # a failed check is being replaced, and does not drain (see __del__).
        self._failed_check = True
        if self.proc.poll() is not None:
            raise self._dead_error()
        if self.problem is not None:
            raise EngineError(self.problem)
        self._failed_check = False

    async def describe(self) -> dict[str, Any]:
        return self.info(self.proc.poll() is None and self.problem is None).model_dump()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member we cannot signal still counts
            return True
        # A signal reaches zombies too: an adopted engine's exited leader stays one until
        # the supervisor reaps it, which made every stop wait out its 10 s for nothing.
        return bool(group_pids(self.proc.pid))

    def _stop_engine(self) -> None:
        # The whole process group, even when the engine itself has exited: vLLM's
        # engine-core and worker processes outlive an API server that was killed (seen:
        # both still running, computing, after `kill -9` of the server). The group id
        # stays reserved while any member lives, so it never names another process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (self.proc.poll() is None or self._group_alive()):
            time.sleep(0.1)
        if self._group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.command.stop:
            # A container outlives its client when the client is killed.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(self.command.stop, capture_output=True, timeout=60, check=False)

    def _drain(self) -> None:
        """Before the engine stops: no new requests, and those in flight finish.

        Serve counts only requests that pass through it (none do), so its own drain
        waits for nothing. The replica tells the registry it takes no more (the gateway
        drops it at its next refresh), then waits until its engine runs and queues
        nothing, within DRAIN_S: Serve kills the replica at graceful_shutdown_timeout_s.
        Blocking is fine here: the replica does nothing else any more.
        """
        import urllib.request

        self.problem = "stopping: finishing the requests in flight"
        self._publish(self.info(False))
        metrics = self.adapter.metrics_path
        started = time.monotonic()
        while time.monotonic() - started < DRAIN_S and self.proc.poll() is None:
            # Requests the gateway sent just before it heard reach the engine first.
            if time.monotonic() - started >= DRAIN_SETTLE_S:
                if metrics is None:
                    return
                try:
                    with urllib.request.urlopen(self.url + metrics, timeout=2) as answer:
                        load = self.adapter.parse_load(answer.read().decode(errors="replace"))
                except (OSError, ValueError):
                    return
                if load is None or load.running + load.waiting == 0:
                    return
            time.sleep(0.2)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown (scale-down, redeploy, `appliance down`).
        self._stopped = True
        # A healthy replica going away (scale-down, redeploy, `down`) drains; a broken
        # one being replaced has nothing worth waiting for.
        serving = getattr(self, "_reporter", None) is not None and self.problem is None
        if serving and not self._failed_check and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._drain()
        if getattr(self, "_registry", None) is not None:
            with contextlib.suppress(Exception):
                self._registry.forget.remote(self.replica_id)
        if hasattr(self, "proc"):
            self._stop_engine()
        if hasattr(self, "work_dir"):
            shutil.rmtree(self.work_dir, ignore_errors=True)


def engine_replica_deployment() -> Any:
    return serve.deployment(EngineReplica, name="engine")
