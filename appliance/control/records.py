"""The records that cross a process boundary, typed once for writer and reader.

    record            carried by                  written by      read by
    Deployment        the state file (SQLite)     `model add`     supervisor, gateway, CLI
    ClusterNode       the status file             supervisor      CLI (`model add`, `plan`)
    ReplicaSpec       Serve's deployment argument supervisor      replica
    ReplicaInfo       registry report (Ray)       replica         registry actor
    RegistrySnapshot  registry answer (Ray)       registry actor  supervisor, gateway
    ScaleState        registry (Ray), status file supervisor      gateway, CLI
    GatewayDemand     registry report (Ray)       gateway worker  registry actor
    StatusFile        <home>/run/appliance.json   supervisor      CLI (`status`, `up`, `top`)

Writers dump a record to plain data (JSON, or dicts over Ray); readers validate it back.
Readers ignore fields they do not know, so a newer writer (a host upgraded first, a
status file left by a newer version) does not break an older reader. Nested config
(the catalog entry, the [engines] section) keeps its own `extra="forbid"`: it is written
by the same version that reads it, within one `appliance up`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    computed_field,
    field_validator,
)

from appliance.catalog import ModelEntry
from appliance.config import EnginesConfig
from appliance.engines.base import EngineLoad
from appliance.gpus import find_gpu
from appliance.placement import Node
from appliance.planner.plan import Plan


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Deployment(Record):
    """A model the appliance should be serving: the plan `model add` made, and a snapshot
    of the catalog entry it made it from (what every replica of it is given). The engine
    is the plan's, stored once."""

    model: str
    plan: Plan
    # None: a row written before records kept it, or one this version's catalog schema
    # cannot read; the supervisor then uses its catalog's entry.
    entry: ModelEntry | None = None
    added_at: float = 0.0

    @property
    def engine(self) -> str:
        return self.plan.engine

    @classmethod
    def from_row(cls, model: str, plan: str, entry: str | None, added_at: float) -> Deployment:
        """A row of state.db's deployments table (JSON columns)."""
        snapshot = None
        if entry is not None:
            try:
                snapshot = ModelEntry.model_validate_json(entry)
            except ValidationError:
                # Written by a version with another catalog schema: the plan still holds.
                snapshot = None
        return cls(model=model, plan=json.loads(plan), entry=snapshot, added_at=added_at)


class ReplicaSpec(Record):
    """What the supervisor hands each replica of a model (Serve's deployment argument)."""

    model: str
    weights: str  # the model's directory in the store
    entry: ModelEntry
    plan: Plan
    engines: EnginesConfig  # the [engines] config section
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = Field(default_factory=dict)
    log_dir: str
    work_dir: str  # per-replica engine files go in a directory below this
    engine_host: str | None  # None: the node's address (multi-host); embedded: 127.0.0.1
    ray_address: str | None
    start_timeout_s: float
    report_interval_s: float
    probe_interval_s: float = 5.0
    probe_timeout_s: float = 20.0
    # Where the supervisor offers an engine it started before Ray (control/warm.py);
    # None: every replica starts its own.
    warm_dir: str | None = None

    @property
    def engine(self) -> str:
        return self.plan.engine


class ClusterNode(Record):
    """One live node of the Ray cluster, as the supervisor last saw it."""

    name: str
    node_id: str
    gpu: str = ""  # GPU type key (appliance.gpus), Ray's name when unknown, "" for none
    accelerator: str = ""  # Ray's accelerator_type name
    gpus: int = 0
    free_gpus: int = 0  # not held by any actor or placement group

    def node(self) -> Node:
        """As the placer takes it: every GPU of the node (deployments' plans say which
        of them are spoken for)."""
        spec = find_gpu(self.gpu) if self.gpu else None
        return Node(
            self.name,
            self.gpu,
            self.gpus,
            spec.memory_mib if spec else None,
            node_id=self.node_id,
            accelerator=self.accelerator,
        )


class Rank(Record):
    """Where one rank (one GPU) of a replica whose stages span nodes runs: its bundle of
    the replica's placement group, which its engine's Ray worker takes."""

    rank: int  # vLLM's: stage * tensor_parallel + the rank inside the stage's TP group
    stage: int
    node: str  # the placer's name for the node
    node_id: str
    bundle: int  # index in the placement group (VLLM_RAY_BUNDLE_INDICES names it)


class ReplicaInfo(Record):
    """What a replica reports about its engine, every report interval."""

    replica_id: str
    model: str
    engine: str
    url: str
    engine_model: str  # the name requests must carry
    # The name responses carry; a writer's None (or nothing) means engine_model.
    response_model: str = Field(None, validate_default=True)
    node: str = ""
    pid: int | None = None
    gpu_ids: tuple[str, ...] = ()
    argv: list[str] = Field(default_factory=list)
    healthy: bool
    problem: str | None = None  # why the engine is not fit for traffic
    # For the gateway only (over Ray, which authenticates); never in the status file.
    engine_key: str | None = None
    load: EngineLoad | None = None  # None: not read (unhealthy, or no metrics page)
    started_at: float = 0.0
    log: str = ""
    warm_start: bool = False  # the engine was started by the supervisor, before Ray
    # Its Ray actor's name (Serve names every replica's actor): the supervisor drops a
    # replica whose actor is gone at once, not when its reports are `max_age` old.
    actor: str = ""
    ranks: list[Rank] = Field(default_factory=list)  # stages across nodes: one per GPU

    @field_validator("response_model", mode="before")
    @classmethod
    def _answers_as_requested(cls, value: str | None, info: ValidationInfo) -> Any:
        # An engine names the model in responses as requests did, unless its adapter says.
        return value or info.data.get("engine_model")


class ReplicaState(ReplicaInfo):
    """A replica as the registry last heard of it: its report, and how old that is."""

    age_s: float = 0.0
    fresh: bool = False  # reported within the registry's max age

    @property
    def routable(self) -> bool:
        """Fit for traffic: the engine answered its checks, and said so recently.

        The one definition used by the supervisor's counts, the gateway's replica table,
        the scrape targets and the CLI.
        """
        return self.healthy and self.fresh


class ScaleState(Record):
    """A model's replica count as the supervisor's scaler last set it, and why
    (control/scaling.py): shown by `appliance status`, and read by the gateway, which holds
    requests for a model that can be woken (`wakeable`) while it has no replica."""

    autoscaled: bool = False  # min_replicas or max_replicas is set
    min_replicas: int = 1
    max_replicas: int = 1
    target_queue: float = 4.0
    priority: int = 0
    target: int = 0  # replicas asked of Ray Serve now
    wanted: int = 0  # what demand asks for within min and max, before the GPU ceiling
    queue: float = 0.0  # requests running and waiting: engines' and the gateway's
    idle_s: float | None = None  # since the model's last request; None: none seen yet
    message: str = ""  # e.g. "wanted 3, have 2: no free GPUs"
    decisions: dict[str, int] = Field(default_factory=dict)  # action -> count, this run

    @property
    def wakeable(self) -> bool:
        """It may be at zero replicas, and a request brings one back."""
        return self.min_replicas == 0

    @property
    def scaled_to_zero(self) -> bool:
        return self.wakeable and self.target == 0


class ModelActivity(Record):
    """What one gateway worker saw of a model lately."""

    waiting: int = 0  # requests held for a replica: a cold start, or every replica full
    idle_s: float | None = None  # since its last request to the model; None: none yet


class GatewayDemand(Record):
    """One gateway worker's report to the registry, every refresh (its demand signal)."""

    models: dict[str, ModelActivity] = Field(default_factory=dict)


class RegistrySnapshot(Record):
    models: list[str] = Field(default_factory=list)  # deployed, whether or not a replica is up
    replicas: list[ReplicaState] = Field(default_factory=list)
    # The supervisor's scaling state per model, and the gateways' demand summed over
    # their workers' fresh reports (waiting: total; idle_s: the least).
    scale: dict[str, ScaleState] = Field(default_factory=dict)
    demand: dict[str, ModelActivity] = Field(default_factory=dict)

    def routable(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.routable]


class GatewayStatus(Record):
    pid: int | None = None
    ready: bool = False  # its /healthz answered, as the instance the supervisor started
    restarts: int = 0
    listen: str = ""  # the address it reported it bound


# The engines' keys are for the gateway: never in the status file, nor in CLI output.
_NO_KEYS: dict[str, Any] = {"replicas": {"__all__": {"engine_key"}}}


class ModelStatus(Record):
    engine: str
    plan: Plan
    status: str  # Serve's application status, or NOT_DEPLOYED
    message: str = ""  # why it is not (fully) deployed
    replicas: list[ReplicaState] = Field(default_factory=list)
    scaling: ScaleState | None = None  # None: written before scaling was recorded

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.routable)

    @property
    def serving(self) -> bool:
        """Up as it should be: a routable replica, or scaled to zero on purpose."""
        if self.status != "RUNNING":
            return False
        return self.healthy_replicas > 0 or (
            self.scaling is not None and self.scaling.scaled_to_zero
        )

    @property
    def failed(self) -> bool:
        """Deploying failed, or it cannot be deployed (the supervisor keeps trying)."""
        return self.status == "DEPLOY_FAILED" or (
            self.status == "NOT_DEPLOYED" and bool(self.message)
        )

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=_NO_KEYS)


class StatusFile(Record):
    """The supervisor's status, rewritten every second; `stale` is the reader's verdict."""

    pid: int
    phase: str = "starting"
    started_at: float = 0.0
    updated_at: float = 0.0
    ray_address: str = ""
    endpoint: str = ""  # the gateway's /v1 URL, as it bound it once it has said so
    gateway: GatewayStatus = Field(default_factory=GatewayStatus)
    nodes: list[ClusterNode] = Field(default_factory=list)  # Ray's live nodes
    models: dict[str, ModelStatus] = Field(default_factory=dict)
    stale: bool = False

    @property
    def ready(self) -> bool:
        """Running, the gateway answers, and every model has a routable replica (or is
        scaled to zero, and a request brings one back)."""
        if self.phase != "running" or not self.gateway.ready:
            return False
        return all(m.serving for m in self.models.values())

    def replicas(self) -> list[ReplicaState]:
        return [r for m in self.models.values() for r in m.replicas]

    def public(self) -> dict[str, Any]:
        """As shown to people and scripts (`appliance status --json`)."""
        return self.model_dump(mode="json", exclude={"models": {"__all__": _NO_KEYS}})

    def file_text(self) -> str:
        data = self.model_dump(
            mode="json", exclude={"models": {"__all__": _NO_KEYS}, "stale": True}
        )
        return json.dumps(data, indent=2, sort_keys=True)
