"""The supervisor: the long-running process behind `appliance up`.

It starts (or joins) Ray, starts Ray Serve with its HTTP proxy disabled, keeps one Serve
application per deployed model in line with the state file (`model add`/`remove` take
effect within a second), sets each model's replica count from its demand and the GPUs
free (control/scaling.py; Serve's external scaler changes the count without touching the
replicas already running), runs the gateway as a child process and restarts it if it
dies, and writes the status file that `appliance status` reads. SIGTERM stops everything
it started: replicas (and with them their engines), Serve, the gateway, then Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.catalog import load_catalog
from appliance.config import ApplianceConfig, load_config
from appliance.control import NAMESPACE
from appliance.control.cluster import ray_nodes
from appliance.control.launch import replica_spec
from appliance.control.records import (
    ClusterNode,
    Deployment,
    GatewayStatus,
    ModelStatus,
    RegistrySnapshot,
    ReplicaSpec,
    ScaleState,
    StatusFile,
)
from appliance.control.runtime import clear_status, supervisor_env, tethered, write_status
from appliance.control.scaling import Decision, Load, Model, Policy, Scaler
from appliance.control.warm import WarmEngines
from appliance.errors import ApplianceError
from appliance.gateway import INSTANCE_ENV
from appliance.logs import capture_own_output, popen_logged
from appliance.observability.targets import (
    engine_targets,
    engine_targets_path,
    write_engine_targets,
)
from appliance.placement import Cluster, Fit, fit
from appliance.planner import Plan
from appliance.state import State
from appliance.store import Store

log = logging.getLogger("appliance.supervisor")

# Embedded Ray stores no large objects: a small object store keeps memory for engines.
EMBEDDED_OBJECT_STORE_BYTES = 200 * 1024 * 1024
# A model whose deployment failed (its engine would not start) is tried again this often.
RETRY_FAILED_S = 60.0
# A gateway that ran this long before exiting starts again without back-off.
GATEWAY_STABLE_S = 60.0


def gateway_url(config: ApplianceConfig) -> str:
    """Where this host reaches its own gateway (loopback when it binds every address)."""
    host = config.gateway.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{config.gateway.scheme}://{host}:{config.gateway.port}"


def _our_error(message: str) -> str:
    """From Serve's text around a failed replica, the appliance's own error and hint."""
    for marker in ("EngineError: ", "ApplianceError: ", "StoreError: "):
        if marker in message:
            return message.rsplit(marker, 1)[1].strip()
    return message


def _app_message(app: Any) -> str:
    """Why an application is not running: Serve's own words, deployment causes first."""
    if app is None:
        return ""
    causes = [_our_error(d.message) for d in app.deployments.values() if d.message]
    text = "\n".join(causes) or app.message or ""
    # Causes end with the replica's error and the engine log's tail; keep the end.
    return text if len(text) <= 2000 else "..." + text[-2000:]


@dataclass
class _Failing:
    """A loop step that fails: the error, how often, and when to try again."""

    what: str
    count: int = 0
    retry_at: float = 0.0


class Supervisor:
    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.state = State(config.state_db)
        self.store = Store(config.store_dir)
        self.catalog = load_catalog(config.catalog)
        self.stopping = threading.Event()
        self.deployed: dict[str, str] = {}  # model -> fingerprint of what was deployed
        self.deployed_at: dict[str, float] = {}
        self.problems: dict[str, str] = {}  # model -> why it is not deployed
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_started_at = 0.0
        self.gateway_restarts = 0
        self.gateway_next_start: float | None = None
        self.gateway_instance = ""
        self.gateway_listen = ""  # the address the gateway reports it bound
        self.gateway_ok = False  # its /healthz answered, as this instance, at the last probe
        self.gateway_answered_at = 0.0
        self.failing: dict[str, _Failing] = {}  # loop step -> how it fails
        self.ray_address = ""
        self.started_at = time.time()
        self.registry: Any = None
        self.warm = WarmEngines(config)
        self.nodes: list[ClusterNode] = []  # Ray's live nodes at the last reconcile
        self.scaler = Scaler()
        self.targets: dict[str, int] = {}  # model -> replicas asked of Serve
        self.scale: dict[str, ScaleState] = {}  # model -> its state at the last reconcile
        self.snapshot = RegistrySnapshot()  # the registry, as the last reconcile read it
        self.scale_errors: dict[str, str] = {}  # model -> the last error setting its count

    # Lifecycle.

    def _handle_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())

    def run(self) -> None:
        self._handle_signals()
        for leftover in self.store.cleanup_partial():
            log.info("removed %s, left by an interrupted install", leftover)
        if not self.config.ray.address:
            # Our own Ray: no process of ours may inherit an address naming another one.
            os.environ.pop("RAY_ADDRESS", None)
        try:
            self._start_warm()
            self._publish("starting Ray")
            self._start_ray()
            # ray.init installs a SIGTERM handler that ends the process at once; ours
            # must win so that `appliance down` gets an orderly shutdown.
            self._handle_signals()
            self._publish("starting Ray Serve")
            self._start_serve()
            self._publish("starting gateway")
            self._start_gateway()
            while not self.stopping.is_set():
                # One failing step (a full disk, a locked state file, Ray busy) must not
                # end the loop: the others go on, and it is tried again with back-off.
                self._step("reconcile", self._reconcile)
                self._step("warm", self.warm.tick)
                self._step("gateway", self._check_gateway)
                self._step("status", lambda: self._publish("running"))
                self.stopping.wait(1.0)
        finally:
            self._shutdown()

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        now = time.monotonic()
        failing = self.failing.get(name)
        if failing is not None and now < failing.retry_at:
            return
        try:
            fn()
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            if failing is None or failing.what != what:
                # Once per condition, not once a second.
                log.error(
                    "%s failed, keeping the last good state: %s",
                    name,
                    what,
                    # Our own errors and I/O say all there is; anything else needs its trace.
                    exc_info=not isinstance(exc, OSError | sqlite3.Error | ApplianceError),
                )
                failing = _Failing(what)
            failing.count += 1
            failing.retry_at = now + min(30.0, 2.0 ** min(failing.count - 1, 5))
            self.failing[name] = failing
            return
        if failing is not None:
            log.info("%s works again (it failed %d times: %s)", name, failing.count, failing.what)
            del self.failing[name]

    def _start_warm(self) -> None:
        """CPU models' first engines start now, while Ray starts (control/warm.py)."""
        deployments = [d for d in self.state.deployments() if self.store.is_installed(d.model)]
        specs = {d.model: spec for d in deployments if (spec := self._spec(d)) is not None}
        self.warm.start_all(deployments, specs)

    def _start_ray(self) -> None:
        import ray

        rc = self.config.ray

        if rc.address:
            ray.init(address=rc.address, namespace=NAMESPACE, log_to_driver=False)
        else:
            # "local": a Ray of our own even when this host already has one (`ray start`, or
            # another appliance's): a bare ray.init() would join whatever
            # /tmp/ray/ray_current_cluster names, and then refuse num_cpus (run() has already
            # dropped a RAY_ADDRESS naming another cluster, before the warm engines start).
            ray.init(
                address="local",
                namespace=NAMESPACE,
                num_cpus=rc.num_cpus,
                num_gpus=rc.num_gpus,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                _node_ip_address="127.0.0.1",
                # The name this host's nvidia-smi view has when `model add` plans
                # without a running Ray (appliance.control.cluster).
                _node_name=socket.gethostname(),
            )
        self.ray_address = ray.get_runtime_context().gcs_address
        log.info("Ray at %s", self.ray_address)

    def _start_serve(self) -> None:
        from ray import serve

        from appliance.control.registry import get_or_create_registry

        serve.start(proxy_location="Disabled")
        self.registry = get_or_create_registry()

    def _start_gateway(self) -> None:
        argv = [sys.executable, "-m", "appliance.gateway", "--ray-address", self.ray_address]
        if self.config.source is not None:
            argv += ["--config", str(self.config.source)]
        self.gateway_instance = uuid.uuid4().hex
        self.gateway_ok = False
        env = {**os.environ, INSTANCE_ENV: self.gateway_instance}
        self.gateway = popen_logged(
            # A gateway whose supervisor is gone would answer ready with nothing behind it.
            tethered(argv, env),
            self.config.log_dir / "gateway.log",
            env=env,
        )
        self.gateway_started_at = self.gateway_answered_at = time.monotonic()
        log.info("gateway started, pid %d", self.gateway.pid)

    def _check_gateway(self) -> None:
        """Restart a gateway that exited, or that stopped answering (the watchdog), backing
        off if it keeps failing (never blocking)."""
        now = time.monotonic()
        if self.gateway_next_start is not None:
            if now >= self.gateway_next_start:
                self.gateway_next_start = None
                self._start_gateway()
            return
        if self.gateway is None:
            return
        if self.gateway.poll() is None:
            self.gateway_ok = self._gateway_ready()
            if self.gateway_ok:
                self.gateway_answered_at = now
                return
            silent = now - self.gateway_answered_at
            if silent < self.config.gateway.watchdog_s:
                return
            log.error(
                "gateway pid %d has not answered /healthz for %.0fs; killing it",
                self.gateway.pid,
                silent,
            )
            self.gateway.kill()
            self.gateway.wait()
        if now - self.gateway_started_at > GATEWAY_STABLE_S:
            self.gateway_restarts = 0
        self.gateway_restarts += 1
        delay = min(30.0, 2.0 ** (self.gateway_restarts - 1))
        log.error(
            "gateway exited with code %s; starting it again in %.0fs (restart %d)",
            self.gateway.returncode,
            delay,
            self.gateway_restarts,
        )
        self.gateway_ok = False
        self.gateway_next_start = now + delay

    def _gateway_ready(self) -> bool:
        """Our own gateway answers: /healthz names the instance this supervisor started
        (a leftover gateway holding the port would answer too, with another name)."""
        # A probe of our own child, often by loopback address: the certificate names the
        # host's public names, so only the connection is checked here, not the name.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = gateway_url(self.config) + "/healthz"
        # One connection per try, and one try more than there are workers: the kernel
        # spreads connections over the workers (SO_REUSEPORT), and a single hung worker,
        # which its gateway replaces itself, must not make the whole gateway look hung.
        for _ in range(self.config.gateway.worker_count + 1):
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                    health = json.loads(resp.read())
                break
            except (OSError, ValueError):
                continue
        else:
            return False
        if not isinstance(health, dict) or health.get("instance") != self.gateway_instance:
            return False
        self.gateway_listen = str(health.get("listen") or "")
        return True

    # Reconciliation: Serve applications follow the deployments in the state file.

    def _spec(self, dep: Deployment) -> ReplicaSpec | None:
        """What each replica of `dep` gets, with the catalog entry its plan was made from
        (the catalog's for records older than that); None when neither has one."""
        entry = dep.entry
        if entry is None and dep.model in self.catalog:
            entry = self.catalog.get(dep.model)
        if entry is None:
            return None
        return replica_spec(self.config, entry, dep.plan, self.ray_address or None)

    def _policy(self, dep: Deployment) -> Policy:
        return Policy.of(self.config.models.get(dep.model), dep.plan.replicas)

    def _deploy(self, dep: Deployment, spec: ReplicaSpec, replicas: int) -> None:
        from ray import serve

        # Imported here, not at the top: it imports Ray Serve, and the warm engines start
        # before anything needs Ray.
        from appliance.control.replica import engine_replica_deployment

        sc = self.config.serve
        app = (
            engine_replica_deployment()
            .options(
                num_replicas=replicas,
                **self._resources(dep.plan),
                health_check_period_s=sc.health_check_period_s,
                health_check_timeout_s=sc.health_check_timeout_s,
                graceful_shutdown_timeout_s=30,
                # Serve sleeps this long before it looks for requests in flight through
                # it, and only then calls the replica's __del__, which drains the engine
                # (replica.py): at Serve's 2 s default, a replica Serve chose to stop went
                # on taking the gateway's requests for 2 s. No request passes through
                # Serve, so there is nothing to wait for.
                graceful_shutdown_wait_loop_s=0.1,
                max_constructor_retry_count=3,
            )
            .bind(spec.model_dump(mode="json"))
        )
        # The supervisor sets the replica count from then on (`_scale`): Serve's external
        # scaler changes it without a new version, so running replicas are kept.
        serve._run(
            app, _blocking=False, name=dep.model, route_prefix=None, external_scaler_enabled=True
        )

    def _scale(self, model: str, replicas: int) -> None:
        """Set a deployed model's replica count; the replicas already running stay.

        Ray Serve's external scaling API (`external_scaler_enabled`), as its dashboard's
        `POST /api/v1/applications/<app>/deployments/<name>/scale` calls it: on the
        controller, as the embedded Ray runs no dashboard. A redeploy with another
        `num_replicas` would give the deployment a new random version and restart
        every replica.
        """
        import ray
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None  # it raises when Serve is not running
        controller = client._controller
        deployment = DeploymentID(name="engine", app_name=model)
        ray.get(controller.update_deployment_replicas.remote(deployment, replicas), timeout=10)

    def _resources(self, plan: Plan) -> dict[str, Any]:
        """What Ray reserves for each replica of `plan`.

        One node: the replica itself holds the plan's CPUs and GPUs. Stages on several
        nodes: a placement group of one {"GPU": 1} bundle per rank, as vLLM's Ray executor
        requires (it refuses bundles of more), the first also holding the replica's CPUs
        (Serve puts the replica in the first bundle), so the replica's node holds GPUs of
        the group: stage 0 goes there. PACK, as Ray Serve LLM does: one bundle per node
        (STRICT_SPREAD) cannot hold a tensor-parallel group, and a whole group in one
        node (STRICT_PACK) is what spanning nodes rules out. PACK does not promise that
        each node gets whole TP groups; the placer (`fit`) only deploys where whole
        stages fit on distinct nodes, and the replica refuses a group split otherwise
        (replica.py `rank_layout`). On nodes of the plan's GPU type, where Ray reports one.
        """
        cluster = Cluster(tuple(n.node() for n in self.nodes)).usable_by(plan.gpu)
        names = {n.accelerator for n in cluster.nodes if n.accelerator} if plan.gpu else set()
        # One name Ray gives those nodes: ask for it (a replica never lands on another type).
        kind = {f"accelerator_type:{names.pop()}": 0.001} if len(names) == 1 else {}
        if not plan.spans_nodes:
            return {
                "ray_actor_options": {
                    "num_cpus": plan.cpus_per_replica,
                    "num_gpus": plan.gpus_per_replica,
                    **({"resources": kind} if kind and plan.gpus_per_replica else {}),
                }
            }
        rank = {"GPU": 1.0, **kind}
        world = plan.tensor_parallel * plan.pipeline_parallel
        return {
            "ray_actor_options": {"num_cpus": plan.cpus_per_replica, "num_gpus": 0},
            "placement_group_bundles": [
                {"CPU": plan.cpus_per_replica, **rank},
                *(dict(rank) for _ in range(world - 1)),
            ],
            "placement_group_strategy": "PACK",
        }

    def _read_nodes(self) -> list[ClusterNode]:
        import ray
        from ray._private.state import available_resources_per_node

        try:
            free = available_resources_per_node()
        except Exception:  # a private API: the free counts are for people only
            free = {}
        return ray_nodes(ray.nodes(), free)

    def _read_registry(self) -> RegistrySnapshot:
        import ray

        return RegistrySnapshot.model_validate(
            ray.get(self.registry.snapshot.remote(self.config.serve.stale_after_s), timeout=5)
        )

    def _drop_dead(self, snapshot: RegistrySnapshot) -> RegistrySnapshot:
        """The snapshot less the replicas whose actor is gone, which the registry forgets
        too: the gateway stops routing to them and status stops listing them within this
        reconcile, not once their last report is `[serve].stale_after_s` old."""
        import ray

        from appliance.control.registry import dead_replicas

        try:
            alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        except Exception as exc:  # the reports' age still ends them
            log.debug("listing Ray's actors failed: %r", exc)
            return snapshot
        dead = set(dead_replicas(snapshot.replicas, alive))
        for replica in snapshot.replicas:
            if replica.replica_id in dead:
                log.info(
                    "replica %s of %s: its Ray actor is gone (stopped without shutting "
                    "down); dropped from the replica table",
                    replica.replica_id,
                    replica.model,
                )
                self.registry.forget.remote(replica.replica_id)
        if not dead:
            return snapshot
        kept = [r for r in snapshot.replicas if r.replica_id not in dead]
        return snapshot.model_copy(update={"replicas": kept})

    def _load(self, model: str, snapshot: RegistrySnapshot) -> Load:
        """A model's demand: its engines' running + waiting and what the gateway holds."""
        routable = [r for r in snapshot.replicas if r.model == model and r.routable]
        engines = sum(r.load.running + r.load.waiting for r in routable if r.load is not None)
        seen = snapshot.demand.get(model)
        held = seen.waiting if seen is not None else 0
        return Load(
            queue=engines + held,
            held=held,
            idle_s=seen.idle_s if seen is not None else None,
            routable=len(routable),
        )

    def _reconcile(self) -> None:
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        desired = {d.model: d for d in self.state.deployments()}
        self.nodes = self._read_nodes()
        # Without the replicas' and the gateway's figures no count is decided: the step
        # fails (logged once, tried again with back-off) and the counts stay as they are.
        self.snapshot = snapshot = self._drop_dead(self._read_registry())
        cluster = Cluster(tuple(n.node() for n in self.nodes))
        apps = serve.status().applications
        now = time.monotonic()
        for model, app in apps.items():
            failed = app.status == ApplicationStatus.DEPLOY_FAILED
            if failed and now - self.deployed_at.get(model, now) > RETRY_FAILED_S:
                log.warning("retrying %s, whose deployment failed: %s", model, app.message)
                self.deployed.pop(model, None)
        specs: dict[str, ReplicaSpec] = {}
        for model, dep in desired.items():
            if not self.store.is_installed(model):
                self.problems[model] = (
                    f"weights for {model} are not in the store {self.store.root}; "
                    f"run `appliance model add {model}`"
                )
                continue
            spec = self._spec(dep)
            if spec is None:
                self.problems[model] = (
                    f"{model} has no catalog entry in its deployment record nor in the "
                    f"catalog; run `appliance model add {model}` again"
                )
                continue
            specs[model] = spec
        # Who gets how many replicas: demand, bounds and priorities, on the placer's view
        # of the nodes alive now (models of higher priority first, then by age).
        models = [
            Model(m, self._policy(desired[m]), self._load(m, snapshot), desired[m].added_at)
            for m in specs
        ]
        order = sorted(models, key=lambda m: (-m.policy.priority, m.added_at, m.name))

        def fits(alloc: Mapping[str, int]) -> dict[str, Fit]:
            plans = [(m.name, replace(desired[m.name].plan, replicas=alloc[m.name])) for m in order]
            return fit(plans, cluster)

        decisions = self.scaler.decide(models, fits)
        for each in order:
            self._apply(desired[each.name], specs[each.name], each.policy, decisions[each.name])
        for model in list(self.deployed):
            if model not in desired:
                log.info("removing %s", model)
                serve.delete(model, _blocking=False)
                del self.deployed[model]
        for table in (self.problems, self.targets, self.scale, self.scale_errors):
            for model in list(table):
                if model not in desired:
                    del table[model]
        self.scaler.forget(specs)
        self.registry.set_models.remote(
            sorted(desired), {m: s.model_dump(mode="json") for m, s in self.scale.items()}
        )

    def _apply(
        self, dep: Deployment, spec: ReplicaSpec, policy: Policy, decision: Decision
    ) -> None:
        """Bring the model's Serve application to the decision's replica count."""
        from ray import serve

        model, target = dep.model, decision.target
        load = self._load(model, self.snapshot)
        if decision.actions:
            log.info(
                "scaling %s: %s, %d -> %d replicas (wanted %d, queue %g, idle %s)%s",
                model,
                " + ".join(decision.actions),
                self.targets.get(model, 0),
                target,
                decision.wanted,
                load.queue,
                "-" if load.idle_s is None else f"{load.idle_s:.1f}s",
                f": {decision.message}" if decision.message else "",
            )
        self.scale[model] = ScaleState(
            autoscaled=policy.autoscaled,
            min_replicas=policy.min_replicas,
            max_replicas=policy.max_replicas,
            target_queue=policy.target_queue,
            priority=policy.priority,
            target=target,
            wanted=decision.wanted,
            queue=load.queue,
            idle_s=load.idle_s,
            message=decision.message,
            decisions=self.scaler.decisions(model),
        )
        if target == 0 and policy.min_replicas > 0:
            # Nothing of it fits: reported, not left pending in Ray. (A model that may
            # scale to zero stays deployed at zero: requests for it wait in the gateway.)
            self.problems[model] = decision.message
            if model in self.deployed:
                serve.delete(model, _blocking=False)
                del self.deployed[model]
            self.targets.pop(model, None)
            return
        # The spec holds the plan: a replan or a config change redeploys (the count does not).
        resources = json.dumps(self._resources(dep.plan), sort_keys=True)
        fingerprint = hashlib.sha256(f"{spec.model_dump_json()} {resources}".encode()).hexdigest()
        if self.deployed.get(model) != fingerprint:
            log.info("deploying %s (%d replicas)", model, target)
            self._deploy(dep, spec, target)
            self.deployed[model] = fingerprint
            self.deployed_at[model] = time.monotonic()
            self.targets[model] = target
        elif self.targets.get(model) != target:
            try:
                self._scale(model, target)
            except Exception as exc:
                what = f"{type(exc).__name__}: {exc}"
                if self.scale_errors.get(model) != what:  # once per condition
                    log.warning("could not set %s to %d replicas: %s", model, target, what)
                    self.scale_errors[model] = what
                return  # tried again at the next reconcile
            self.scale_errors.pop(model, None)
            self.targets[model] = target
        if decision.blocked:
            self.problems[model] = decision.message
        else:
            self.problems.pop(model, None)

    # Status.

    def _models_status(self) -> dict[str, ModelStatus]:
        from ray import serve

        try:
            snapshot = self._read_registry()
        except Exception as exc:
            log.warning("registry snapshot failed: %r", exc)
            snapshot = RegistrySnapshot()
        apps = serve.status().applications
        models: dict[str, ModelStatus] = {}
        for dep in self.state.deployments():
            app = apps.get(dep.model)
            models[dep.model] = ModelStatus(
                engine=dep.engine,
                plan=dep.plan,
                status=str(app.status.value) if app else "NOT_DEPLOYED",
                message=self.problems.get(dep.model) or _app_message(app),
                replicas=[r for r in snapshot.replicas if r.model == dep.model],
                scaling=self.scale.get(dep.model),
            )
        return models

    def _publish(self, phase: str) -> None:
        live = self.registry is not None and phase == "running"
        models = self._models_status() if live else {}
        status = StatusFile(
            pid=os.getpid(),
            phase=phase,
            started_at=self.started_at,
            ray_address=self.ray_address,
            nodes=self.nodes if live else [],
            gateway=GatewayStatus(
                pid=self.gateway.pid if self.gateway else None,
                ready=self.gateway_ok,
                restarts=self.gateway_restarts,
                listen=self.gateway_listen,
            ),
            # The address the gateway really bound (wildcard included), once it has said so.
            endpoint=(self.gateway_listen or gateway_url(self.config)) + "/v1",
            models=models,
        )
        if live:
            targets = engine_targets(status.replicas())
            if write_engine_targets(engine_targets_path(self.config), targets):
                log.info("engine scrape targets: %d replica(s)", len(targets))
        write_status(self.config, status)

    def _shutdown(self) -> None:
        self._publish_quietly("stopping")
        # Engines are about to stop: Prometheus should not count them as down targets.
        with contextlib.suppress(OSError):
            write_engine_targets(engine_targets_path(self.config), [])
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                # All at once: each replica waits for its engine's requests in flight.
                for model in list(self.deployed):
                    log.info("stopping %s", model)
                    try:
                        serve.delete(model, _blocking=False)
                    except Exception as exc:
                        log.warning("could not delete %s cleanly: %r", model, exc)
                self._wait_deleted(set(self.deployed))
                serve.shutdown()
                if self.registry is not None:
                    ray.kill(self.registry)
        finally:
            if self.gateway is not None and self.gateway.poll() is None:
                self.gateway.terminate()
                try:
                    self.gateway.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.gateway.kill()
                    self.gateway.wait()
            # Replicas stop the engines they adopted; these are the ones nobody did.
            self.warm.stop_all()
            import ray

            ray.shutdown()
            clear_status(self.config)
            log.info("stopped")

    def _wait_deleted(self, models: set[str], timeout_s: float = 60.0) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                left = models & set(serve.status().applications)
            except Exception as exc:
                log.warning("could not read Serve's status while stopping: %r", exc)
                return
            if not left:
                return
            time.sleep(0.2)
        log.warning("still stopping after %.0fs: %s", timeout_s, ", ".join(sorted(left)))

    def _publish_quietly(self, phase: str) -> None:
        with contextlib.suppress(OSError):
            write_status(
                self.config, StatusFile(pid=os.getpid(), phase=phase, started_at=self.started_at)
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="appliance-supervisor")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--log-file", type=Path, default=None, help="write output here, rotated (detached runs)"
    )
    args = parser.parse_args(argv)
    if args.log_file is not None:
        capture_own_output(args.log_file)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        env = supervisor_env(config)
    except ApplianceError as exc:
        log.error("%s", exc)
        sys.exit(2)
    missing = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if missing:
        # Ray reads these when it is imported (this module already did): start afresh.
        os.execve(
            sys.executable,
            [
                sys.executable,
                "-m",
                "appliance.control.supervisor",
                *(argv if argv is not None else sys.argv[1:]),
            ],
            {**os.environ, **missing},
        )
    Supervisor(config).run()


if __name__ == "__main__":
    main()
