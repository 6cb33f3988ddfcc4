"""The metric names dashboards and alert rules may use, besides the engines' own.

The gateway's names are the contract of its `/metrics` (on the gateway's port, admin-scope API
key): each with its type and labels; a test holds them to the gateway's own registry
(appliance/gateway/metrics.py). The engines' names (`vllm:*`, `trtllm_*`) are the lists
read from the real engines in tests/fixtures/contracts/. DCGM's are the fields of NVIDIA's
dcgm-exporter default counters (etc/default-counters.csv) that the GPU dashboard reads.
A test parses every dashboard and rule expression and checks each metric name against these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str

    def series_names(self) -> set[str]:
        """The sample names Prometheus stores for it (a histogram is three series)."""
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


# Buckets of the gateway's latency histograms: 5 ms to 60 s.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip

GATEWAY_METRICS: tuple[Metric, ...] = (
    Metric(
        "appliance_requests_total",
        "counter",
        ("model", "key", "status", "upstream"),
        "Requests answered, by model, key name, HTTP status and upstream (local or a cloud).",
    ),
    Metric(
        "appliance_request_duration_seconds",
        "histogram",
        ("model", "upstream"),
        "End-to-end time of a request, from its arrival to the last byte of the answer.",
    ),
    Metric(
        "appliance_time_to_first_token_seconds",
        "histogram",
        ("model", "upstream"),
        "Time from a request's arrival to the first token of its answer.",
    ),
    Metric(
        "appliance_time_per_output_token_seconds",
        "histogram",
        ("model", "upstream"),
        "Time between output tokens after the first (inter-token latency).",
    ),
    Metric("appliance_prompt_tokens_total", "counter", ("model", "key"), "Prompt tokens."),
    Metric("appliance_completion_tokens_total", "counter", ("model", "key"), "Completion tokens."),
    Metric(
        "appliance_spend_total",
        "counter",
        ("model", "key"),
        "Spend in the configured currency, at the governance prices.",
    ),
    Metric(
        "appliance_replica_in_flight",
        "gauge",
        ("model", "replica"),
        "Requests the gateway has in flight on a replica.",
    ),
    Metric(
        "appliance_replica_queued",
        "gauge",
        ("model", "replica"),
        "Requests waiting for room on a replica.",
    ),
    Metric(
        "appliance_replicas_healthy",
        "gauge",
        ("model",),
        "Replicas of a model that are healthy and fresh in the gateway's table.",
    ),
    Metric(
        "appliance_gateway_in_flight",
        "gauge",
        (),
        "Requests the gateway is handling now, all workers.",
    ),
    Metric(
        "appliance_rejections_total",
        "counter",
        ("model", "reason"),
        "Requests refused by the limiter or admission, by reason.",
    ),
    Metric(
        "appliance_engine_errors_total",
        "counter",
        ("model", "replica"),
        "Requests that failed at the engine (5xx, broken streams, connection errors).",
    ),
    # Cloud overflow (appliance/gateway/overflow.py); requests, latency and status per
    # provider are the series above with upstream=<provider>.
    Metric(
        "appliance_overflow_total",
        "counter",
        ("model", "provider", "reason"),
        "Requests answered by a cloud provider, by the trigger.",
    ),
    Metric(
        "appliance_overflow_refused_total",
        "counter",
        ("model", "reason"),
        "Requests a trigger would have overflowed that stayed local, by why.",
    ),
    Metric(
        "appliance_cloud_errors_total",
        "counter",
        ("model", "provider", "code"),
        "Overflowed requests no provider answered.",
    ),
    Metric(
        "appliance_cloud_spend_total",
        "counter",
        ("provider", "model", "key"),
        "What cloud providers charge for answered requests.",
    ),
    Metric(
        "appliance_cloud_breaker_state",
        "gauge",
        ("provider",),
        "Each provider's circuit breaker: 0 closed, 1 half-open, 2 open.",
    ),
    Metric(
        "appliance_cloud_latency_seconds",
        "gauge",
        ("provider",),
        "Each provider's recent time to first byte.",
    ),
    Metric(
        "appliance_route_decisions_total",
        "counter",
        ("model", "decision"),
        "How requests were placed on a replica: affinity, session_home, spill or load.",
    ),
    Metric(
        "appliance_cold_start_wait_seconds",
        "histogram",
        ("model",),
        "How long requests for a model scaled to zero waited for its first replica.",
    ),
    Metric(
        "appliance_replicas_target",
        "gauge",
        ("model",),
        "Replicas the supervisor asks Ray Serve for.",
    ),
    Metric(
        "appliance_replicas_wanted",
        "gauge",
        ("model",),
        "Replicas the model's demand asks for, before the GPU ceiling.",
    ),
    Metric(
        "appliance_scaling_decisions_total",
        "counter",
        ("model", "action"),
        "Scaling decisions: up, down, to_zero, from_zero, reclaimed, blocked.",
    ),
)

# Counters of events (a rejection, an engine error): a labelled counter has no series until
# its first event, so queries over these alone may rightly return nothing.
EVENT_COUNTERS = frozenset(
    {
        "appliance_rejections_total",
        "appliance_engine_errors_total",
        "appliance_overflow_total",
        "appliance_overflow_refused_total",
        "appliance_cloud_errors_total",
        "appliance_cloud_spend_total",
        "appliance_scaling_decisions_total",
    }
)

# NVIDIA dcgm-exporter (etc/default-counters.csv), the fields the GPU dashboard reads; each
# series has the labels gpu, UUID, device, modelName and Hostname.
DCGM_METRICS: tuple[Metric, ...] = (
    Metric("DCGM_FI_DEV_GPU_UTIL", "gauge", ("gpu",), "GPU utilisation (in %)."),
    Metric("DCGM_FI_DEV_FB_USED", "gauge", ("gpu",), "Framebuffer memory used (in MiB)."),
    Metric("DCGM_FI_DEV_FB_FREE", "gauge", ("gpu",), "Framebuffer memory free (in MiB)."),
    Metric("DCGM_FI_DEV_GPU_TEMP", "gauge", ("gpu",), "GPU temperature (in C)."),
    Metric("DCGM_FI_DEV_POWER_USAGE", "gauge", ("gpu",), "Power draw (in W)."),
)

# What Prometheus itself adds to every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def gateway_series() -> set[str]:
    return {name for m in GATEWAY_METRICS for name in m.series_names()}


def dcgm_series() -> set[str]:
    return {name for m in DCGM_METRICS for name in m.series_names()}
