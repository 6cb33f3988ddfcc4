"""What every engine adapter provides.

An engine is a separate process that speaks the OpenAI HTTP API. Its adapter turns
(catalog entry, plan, weights path, port, GPU ids) into argv and env, and knows how to
tell that the engine is ready and how loaded it is. Nothing here imports the engine.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from appliance.config import EngineConfig

if TYPE_CHECKING:
    from appliance.catalog import ModelEntry
    from appliance.planner import Plan


@dataclass(frozen=True)
class LaunchSpec:
    """Everything an adapter needs to build an engine command line."""

    model: str  # public model name, as clients call it
    weights: Path  # installed checkpoint directory in the store
    host: str
    port: int
    entry: ModelEntry
    plan: Plan
    gpu_ids: tuple[str, ...] = ()
    # Where the adapter's own files (engine config) are written before the engine starts.
    work_dir: Path = Path(".")
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    # Multi-node plans: the Ray cluster the engine's own executor joins, the hex id of
    # the replica's placement group, whose bundles its workers take, and the bundle of
    # each rank, in rank order.
    ray_address: str | None = None
    placement_group: str | None = None
    bundle_indices: tuple[int, ...] = ()
    # A secret only the gateway knows, for engines that can require one on their API
    # (see EngineAdapter.requires_key); None: no key.
    api_key: str | None = None


@dataclass(frozen=True)
class EngineLaunch:
    """A ready-to-run engine process: the command, its environment and how to probe it."""

    argv: list[str]
    env: dict[str, str]
    health_path: str
    # The model name the engine expects in requests; the gateway rewrites `model` to it.
    engine_model: str
    # A request that must succeed before the engine takes traffic (path, JSON body).
    warmup: tuple[str, dict[str, Any]] | None = None
    # The name the engine puts in responses, when it differs from `engine_model`; the
    # gateway rewrites it back to the public name.
    response_model: str | None = None
    # Files the engine reads (name in work_dir -> content), written before it starts.
    files: dict[str, str] = field(default_factory=dict)
    # Environment the engine needs but that must never appear on a command line (a
    # container runner passes it by name): the API key.
    secret_env: dict[str, str] = field(default_factory=dict)
    # The key the engine requires on its API (Authorization: Bearer), if any.
    api_key: str | None = None


@dataclass(frozen=True)
class EngineLoad:
    """Load figures read from an engine's metrics."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def prometheus_sums(text: str, names: set[str]) -> dict[str, float]:
    """Sum each named metric over its label sets (one engine may report several)."""
    sums: dict[str, float] = {}
    for match in _SAMPLE.finditer(text):
        name = match.group(1)
        if name in names:
            try:
                sums[name] = sums.get(name, 0.0) + float(match.group(3))
            except ValueError:
                continue
    return sums


def warmup_request(spec: LaunchSpec, model: str) -> tuple[str, dict[str, Any]]:
    """One cheap real request, shaped for the model's kind."""
    if spec.entry.kind == "embedding":
        return "/v1/embeddings", {"model": model, "input": "ping"}
    return (
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
    )


class EngineAdapter(ABC):
    name: ClassVar[str]
    # Whether the engine can require an API key (its API then answers 401 without it).
    # Engines that cannot are kept off the LAN by the firewall instead.
    accepts_api_key: ClassVar[bool] = False
    metrics_path: ClassVar[str | None] = None
    # Metric names read for the load report: running, waiting, KV-cache usage (0..1).
    load_metrics: ClassVar[tuple[str, str, str] | None] = None
    # Request fields beyond OpenAI's that the engine documents and the gateway lets
    # through (chat, completions and embeddings together). A dotted name is a field of
    # an inner object: `messages.reasoning` is one in a chat message.
    request_extensions: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: EngineConfig | None = None) -> None:
        self.settings = settings or EngineConfig()

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> EngineLaunch:
        """The command line, environment and probes for one engine process."""

    def parse_load(self, metrics_text: str) -> EngineLoad | None:
        """Turn the engine's metrics page into load figures; None when it has none."""
        if self.load_metrics is None:
            return None
        running, waiting, kv = self.load_metrics
        sums = prometheus_sums(metrics_text, {running, waiting, kv})
        if running not in sums and waiting not in sums:
            return None
        return EngineLoad(sums.get(running, 0.0), sums.get(waiting, 0.0), sums.get(kv))
