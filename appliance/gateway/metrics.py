"""The gateway's Prometheus metrics (prometheus-client), served on `GET /metrics`.

Everything is counted at one point, when a request's ledger row is complete
(`Gateway._emit`: answered, refused, failed or abandoned), from that row: so the metrics,
the ledger, the audit log and the access log always tell the same story. The request path
pays a few dictionary lookups and counter increments per request, nothing per chunk.

With several gateway workers (one port, SO_REUSEPORT) each worker counts in its own
memory-mapped files under `<run>/gateway-metrics` (prometheus-client's multiprocess mode,
`PROMETHEUS_MULTIPROC_DIR`), and whichever worker a scrape reaches adds up every file:
counters of a worker that died stay in the sum (a restart never makes a counter go back),
its live gauges are dropped (`mark_process_dead`, called by the worker's parent). The
directory is emptied when the gateway starts, as a restarted single process would be.

Replica gauges (in flight, queued, healthy) are read when scraped, from the counts the
workers already share (`SharedCounts`): they are the host's figures whichever worker
answers, and the request path does nothing extra for them.

Labels are bounded: `key` is a key's name (admins make keys; never the secret), `model` is
a model the gateway serves or "-" (a client may send any string as a model name; those
must not make series), `upstream` is "local" for the appliance's own replicas, "-" for a
request refused before one was chosen.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from appliance.config import ModelPrice
    from appliance.gateway.errors import GatewayError
    from appliance.gateway.replicas import ReplicaTable
    from appliance.ledger import UsageRow

log = logging.getLogger("appliance.gateway")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# From 5 ms (a cached, tiny answer) to a minute (a long generation), for all three.
BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
# A model scaled to zero starts an engine: seconds on the stand-in, minutes for a large
# model on GPUs (weights, CUDA graphs).
COLD_START_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
NONE = "-"  # a label whose value is unknown (no key, an unknown model, no upstream)
LOCAL = "local"

# Why a request was refused, by the error code the gateway answered with. A test checks
# that every code the gateway raises is in one of these sets (a new one must be placed).
REASONS = {
    "invalid_api_key": "unauthenticated",
    "model_not_allowed": "model_not_allowed",
    "model_not_found": "model_not_found",
    "model_unavailable": "no_replica",
    "model_cold_start_timeout": "cold_start_timeout",
    "model_overloaded": "overloaded",
    "too_many_connections": "too_many_connections",
    "concurrency_limit_exceeded": "concurrency",
    "key_limit_exceeded": "key_limit",
    "context_length_exceeded": "context_length_exceeded",
    "request_too_large": "request_too_large",
    "headers_too_large": "request_too_large",
    "request_timeout": "request_timeout",
}
# The schema checks (validate.py, schema.py) and malformed requests: "invalid_request".
INVALID_REQUEST = frozenset(
    {
        "invalid_request",
        "invalid_json",
        "invalid_type",
        "invalid_value",
        "invalid_messages",
        "invalid_http",
        "missing_required_parameter",
        "unknown_parameter",
        "unsupported_parameter",
        "unsupported_value",
        "too_deep",
    }
)
# Not refusals: failures (the engine's, the gateway's own), and answers outside the
# inference routes (/metrics).
NOT_REFUSALS = frozenset(
    {"engine_error", "engine_rejected", "internal_error", "admin_key_required"}
)


def upstream_of(row: UsageRow) -> str:
    """Where the request ran: a cloud provider's name, "local" (a replica of this
    appliance), "-" (nowhere)."""
    return row.upstream or (LOCAL if row.replica else NONE)


def rejection_reason(err: GatewayError) -> str | None:
    """The `reason` label of a refusal, or None when the error is not one (the engine's
    own answer, passed on, or a failure)."""
    code = err.code or ""
    if err.engine or code in NOT_REFUSALS:
        return None
    if code == "rate_limit_exceeded":  # the limiter's 429s name what ran out in `type`
        return "tpm" if err.type == "tokens" else "rpm"
    if code in REASONS:
        return REASONS[code]
    return "invalid_request" if code in INVALID_REQUEST else "other"


def prepare_multiprocess_dir(path: Path) -> None:
    """Empty `path` and point prometheus-client at it, before any metric exists: the
    process and the workers it forks then count in files there."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    from prometheus_client import values

    # The library picks its value class when it is first imported; if anything imported
    # it before the variable was set, pick again (what its own tests do).
    values.ValueClass = values.get_value_class()


# The files prometheus-client makes for this process's values, with the size it gives them.
_FILES = ("counter", "histogram", "gauge_livesum")
_FILE_BYTES = 1 << 20


def _preallocate(directory: Path) -> None:
    """Give this process's value files their blocks now. prometheus-client makes them
    sparse and writes through mmap: on a full disk, touching a page without a block is
    SIGBUS, which would kill the worker mid-request (shared.py preallocates for the same
    reason). A zero-filled file is what the library expects of a new one. The first MiB
    holds thousands of series; growth beyond it is the library's, sparse again."""
    for kind in _FILES:
        path = directory / f"{kind}_{os.getpid()}.db"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("metrics: cannot create %s: %r", path, exc)
            continue
        try:
            if os.fstat(fd).st_size == 0:
                os.posix_fallocate(fd, 0, _FILE_BYTES)
        except OSError as exc:  # a full disk now: the values are counted all the same
            log.warning("metrics: cannot preallocate %s: %r", path, exc)
        finally:
            os.close(fd)


def mark_dead(pid: int) -> None:
    """A worker exited: drop its live gauges from the sum (its counters stay)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


class GatewayMetrics:
    """The gateway's metrics, and the registry `/metrics` renders."""

    def __init__(
        self,
        table: ReplicaTable,
        prices: Mapping[str, ModelPrice] | None = None,
        multiprocess_dir: Path | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.table = table
        self.prices = dict(prices or {})
        if multiprocess_dir is None and os.environ.get(MULTIPROC_ENV):
            multiprocess_dir = Path(os.environ[MULTIPROC_ENV])
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            _preallocate(multiprocess_dir)
        # In multiprocess mode the values live in files; this registry only names them.
        # A registry of our own, not the library's global one: several apps in one test
        # process must not collide.
        own = CollectorRegistry(auto_describe=True)
        self._own = own
        model_upstream = ("model", "upstream")
        self.requests = Counter(
            "appliance_requests_total",
            "Requests the gateway finished, by model, key name, HTTP status and upstream.",
            ("model", "key", "status", "upstream"),
            registry=own,
        )
        self.duration = Histogram(
            "appliance_request_duration_seconds",
            "End to end time of answered requests, from arrival to the last byte.",
            model_upstream,
            buckets=BUCKETS,
            registry=own,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from arrival to the first streamed chunk (to the whole answer when not "
            "streamed), for answered requests.",
            model_upstream,
            buckets=BUCKETS,
            registry=own,
        )
        self.tpot = Histogram(
            "appliance_time_per_output_token_seconds",
            "Per streamed request with at least 2 completion tokens: (end - first token) / "
            "(completion tokens - 1).",
            model_upstream,
            buckets=BUCKETS,
            registry=own,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens_total",
            "Prompt tokens of answered requests.",
            ("model", "key"),
            registry=own,
        )
        self.completion_tokens = Counter(
            "appliance_completion_tokens_total",
            "Completion tokens of answered requests.",
            ("model", "key"),
            registry=own,
        )
        self.spend = Counter(
            "appliance_spend_total",
            "What answered requests cost at the [governance.prices] of their model, in "
            "the configured currency (0 for models without a price).",
            ("model", "key"),
            registry=own,
        )
        self.rejections = Counter(
            "appliance_rejections_total",
            "Requests refused by admission control and the per-key limiter, by reason.",
            ("model", "reason"),
            registry=own,
        )
        self.engine_errors = Counter(
            "appliance_engine_errors_total",
            "Engine failures seen by the gateway: unreachable, a 5xx, a broken stream.",
            ("model", "replica"),
            registry=own,
        )
        self.routes = Counter(
            "appliance_route_decisions_total",
            "How requests were placed on a replica: affinity (where their prompt prefix "
            "went), session_home (a new X-Appliance-Session), spill (the prefix's replica "
            "was too loaded) or load (no prefix known).",
            ("model", "decision"),
            registry=own,
        )
        table.chooser.on_decision = self.routed
        self.cold_starts = Histogram(
            "appliance_cold_start_wait_seconds",
            "How long requests for a model scaled to zero waited for its first replica "
            "(answered ones; those that waited too long are rejections, cold_start_timeout).",
            ("model",),
            buckets=COLD_START_BUCKETS,
            registry=own,
        )
        # Requests this worker is handling, set once a second (not twice a request); the
        # sum over live workers (a dead worker's figure goes with it).
        self.in_flight = Gauge(
            "appliance_gateway_in_flight",
            "Requests the gateway is handling now (all workers).",
            registry=own,
            multiprocess_mode="livesum",
        )
        # Cloud overflow (gateway/overflow.py): requests, latency and status per provider
        # are the series above with upstream=<provider>; these add the decisions, the
        # providers' failures, the spend, and each provider's breaker and latency.
        self.overflows = Counter(
            "appliance_overflow_total",
            "Requests sent to a cloud provider, by the provider that answered and the "
            "trigger (latency, local_unavailable, local_full, local_error, images).",
            ("model", "provider", "reason"),
            registry=own,
        )
        self.overflow_refusals = Counter(
            "appliance_overflow_refused_total",
            "Requests a trigger would have overflowed that stayed local, by why (data_class, "
            "not_opted_in, anonymous, max_share, spend_cap, breakers_open, provider_failed).",
            ("model", "reason"),
            registry=own,
        )
        self.cloud_errors = Counter(
            "appliance_cloud_errors_total",
            "Overflowed requests no provider answered, by the last provider tried and the "
            "error code.",
            ("model", "provider", "code"),
            registry=own,
        )
        self.cloud_spend = Counter(
            "appliance_cloud_spend_total",
            "What cloud providers charge for answered requests, from [burst] prices.",
            ("provider", "model", "key"),
            registry=own,
        )
        self.breaker = Gauge(
            "appliance_cloud_breaker_state",
            "Each provider's circuit breaker: 0 closed, 1 half-open, 2 open (the worst "
            "over the workers, as each last saw it).",
            ("provider",),
            registry=own,
            multiprocess_mode="livemax",
        )
        self.cloud_latency = Gauge(
            "appliance_cloud_latency_seconds",
            "Each provider's recent time to first byte (EWMA; the slowest over the workers).",
            ("provider",),
            registry=own,
            multiprocess_mode="livemax",
        )
        # The hot path keeps label children in hand: `labels()` costs a lock and a tuple.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._answered: dict[tuple[str, str, str], _Answered] = {}
        if multiprocess_dir is None:
            own.register(_ReplicaGauges(table))

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def model_label(self, model: str | None) -> str:
        return model if model is not None and self.table.knows(model) else NONE

    # The request path.

    def routed(self, model: str, decision: str) -> None:
        self._child(self.routes, model, decision).inc()

    def cold_started(self, model: str, waited_s: float) -> None:
        self._child(self.cold_starts, self.model_label(model)).observe(waited_s)

    def set_in_flight(self, requests: int) -> None:
        self.in_flight.set(requests)

    def _answered_children(self, model: str, key: str, upstream: str) -> _Answered:
        found = self._answered.get((model, key, upstream))
        if found is None:
            found = self._answered[(model, key, upstream)] = _Answered(
                self.requests.labels(model, key, "200", upstream),
                self.duration.labels(model, upstream),
                self.ttft.labels(model, upstream),
                self.tpot.labels(model, upstream),
                self.prompt_tokens.labels(model, key),
                self.completion_tokens.labels(model, key),
                # Made at once, so the series exists (at 0) for a model without a price.
                self.spend.labels(model, key),
                self.prices.get(model),
            )
        return found

    def record(self, row: UsageRow, err: GatewayError | None, now: float) -> None:
        """One finished request, from its complete ledger row; `now` is its end, a
        wall-clock time like `row.ts` (its arrival)."""
        model = self.model_label(row.model)
        key = row.key or NONE
        upstream = upstream_of(row)
        if row.status == 200:  # the common case: its children in one lookup
            c = self._answered_children(model, key, upstream)
            c.requests.inc()
            c.duration.observe(now - row.ts)
            prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
            if row.ttft_ms is not None:
                ttft = row.ttft_ms / 1000
                c.ttft.observe(ttft)
                # A whole answer arrives at once: it has no time per token of its own.
                if row.stream and completion >= 2:
                    c.tpot.observe(max(0.0, (now - row.ts - ttft) / (completion - 1)))
            c.prompt_tokens.inc(prompt)
            c.completion_tokens.inc(completion)
            if row.upstream is not None:
                if row.cost:
                    self._child(self.cloud_spend, row.upstream, model, key).inc(row.cost)
            elif c.price is not None:
                c.spend.inc(c.price.cost(prompt, completion))
            return
        child = self._child
        child(self.requests, model, key, str(row.status), upstream).inc()
        if row.error == "engine_error" and row.replica:
            child(self.engine_errors, model, row.replica).inc()
        if err is not None and row.upstream is None:  # a provider's error is not a refusal
            reason = rejection_reason(err)
            if reason is not None:
                child(self.rejections, model, reason).inc()

    def refused(self, reason: str, model: str | None = None) -> None:
        """A refusal that has no ledger row (the connection caps, the in-flight cap)."""
        self._child(self.rejections, self.model_label(model), reason).inc()

    def overflowed(self, model: str, provider: str, reason: str) -> None:
        self._child(self.overflows, self.model_label(model), provider, reason).inc()

    def overflow_refused(self, model: str | None, reason: str) -> None:
        self._child(self.overflow_refusals, self.model_label(model), reason).inc()

    def cloud_failed(self, model: str, provider: str, code: str) -> None:
        self._child(self.cloud_errors, self.model_label(model), provider, code).inc()

    def providers(self, status: Mapping[str, Mapping[str, Any]]) -> None:
        """Each provider's breaker and latency (Burst.status()), as this worker sees them."""
        for name, state in status.items():
            self._child(self.breaker, name).set(_BREAKER_STATES[state["breaker"]])
            if state["latency_s"] is not None:
                self._child(self.cloud_latency, name).set(state["latency_s"])

    def engine_failed(self, model: str, replica: str) -> None:
        """A replica refused a connection; the request goes on to another."""
        self._child(self.engine_errors, self.model_label(model), replica).inc()

    # Scrapes.

    def registry(self) -> CollectorRegistry:
        """What /metrics renders: every worker's counts, and the replica gauges now."""
        from prometheus_client import CollectorRegistry, multiprocess

        if self.multiprocess_dir is None:
            return self._own
        registry = CollectorRegistry()
        registry.register(
            _Ours(multiprocess.MultiProcessCollector(None, str(self.multiprocess_dir)))
        )
        registry.register(_ReplicaGauges(self.table))
        return registry

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry())


class _Ours:
    """Only the appliance's metrics from the shared directory: a library in the process
    (Ray's driver) that makes prometheus-client metrics of its own must not add to ours."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> Iterable[Metric]:
        return [m for m in self.collector.collect() if m.name.startswith("appliance_")]


@dataclass(frozen=True)
class _Answered:
    """The children an answered request counts in, for one (model, key, upstream)."""

    requests: Any
    duration: Any
    ttft: Any
    tpot: Any
    prompt_tokens: Any
    completion_tokens: Any
    spend: Any
    price: ModelPrice | None


class _ReplicaGauges:
    """The replica table's figures at scrape time (a prometheus-client custom collector),
    and the supervisor's scaling state, which the table holds from the registry: replica
    counts set and wanted, and the scaling decisions counted since the supervisor started
    (a counter that goes back to 0 when it restarts, as any process's does)."""

    def __init__(self, table: ReplicaTable) -> None:
        self.table = table

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        table = self.table
        in_flight = GaugeMetricFamily(
            "appliance_replica_in_flight",
            "Requests the gateway has sent to each replica and not yet finished (all workers).",
            labels=("model", "replica"),
        )
        queued = GaugeMetricFamily(
            "appliance_replica_queued",
            "Requests waiting in the gateway for room on a replica of the model (all "
            'workers). The line is per model: it is reported once, as replica "-".',
            labels=("model", "replica"),
        )
        healthy = GaugeMetricFamily(
            "appliance_replicas_healthy",
            "Replicas of the model the gateway routes to now (healthy, fresh, not just failed).",
            labels=("model",),
        )
        target = GaugeMetricFamily(
            "appliance_replicas_target",
            "Replicas the supervisor asks Ray Serve for (its scaling decision).",
            labels=("model",),
        )
        wanted = GaugeMetricFamily(
            "appliance_replicas_wanted",
            "Replicas the model's demand asks for within min_replicas and max_replicas, "
            "before the GPU ceiling: above the target when GPUs are short.",
            labels=("model",),
        )
        decisions = CounterMetricFamily(
            "appliance_scaling_decisions",
            "Scaling decisions by model and action: up, down, to_zero, from_zero, reclaimed "
            "(gave a replica to a model of higher priority), blocked (no GPUs to grow).",
            labels=("model", "action"),
        )
        for model in table.models:
            replicas = table.replicas(model)
            for replica in replicas:
                in_flight.add_metric((model, replica.replica_id), table.in_flight(replica))
            queued.add_metric((model, NONE), table.counts.waiting(model))
            healthy.add_metric((model,), len(table.healthy(model)))
            state = table.scale.get(model)
            if state is not None:
                target.add_metric((model,), state.target)
                wanted.add_metric((model,), state.wanted)
                for action, count in sorted(state.decisions.items()):
                    decisions.add_metric((model, action), count)
        return [in_flight, queued, healthy, target, wanted, decisions]
