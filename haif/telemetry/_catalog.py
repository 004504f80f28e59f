"""Every metric HAIF exports: name, type, help, label names, buckets, how processes merge.

One table, so that the recording side, the aggregator, the README and the Grafana
dashboard agree on names; a metric not in it cannot be recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "max"]

# Seconds. Request latency spans a cached embedding (ms) to a long generation (minutes).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
WORKER_STATES = ("pending", "loading", "ready", "draining", "failed", "dead")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exported; counters end in _total
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms: upper bounds, +Inf implied
    merge: Merge = "sum"  # gauges: how the values of several processes combine
    component: str = ""  # who records it (documentation)

    def series_names(self) -> tuple[str, ...]:
        """The names that appear on the wire (a histogram has three)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


CATALOG: tuple[MetricSpec, ...] = (
    # --- HTTP Bridge -----------------------------------------------------------------
    MetricSpec("haif_http_requests_total", "counter",
               "HTTP requests answered by the Bridge, by route, model and status code.",
               ("endpoint", "model", "status"), component="bridge"),
    MetricSpec("haif_http_request_duration_seconds", "histogram",
               "End-to-end latency of HTTP requests at the Bridge (streams: until the last byte).",
               ("endpoint", "model"), LATENCY_BUCKETS_S, component="bridge"),
    MetricSpec("haif_time_to_first_token_seconds", "histogram",
               "Streamed requests: time from the Bridge receiving the request to the first chunk.",
               ("model",), TTFT_BUCKETS_S, component="bridge"),
    MetricSpec("haif_inter_token_latency_seconds", "histogram",
               "Streamed requests: time between consecutive chunks sent to the client.",
               ("model",), ITL_BUCKETS_S, component="bridge"),
    # --- Gateway -----------------------------------------------------------------------
    MetricSpec("haif_requests_total", "counter",
               "Inference requests seen by the Gateways, by model, the version that served "
               "them (a rollout's canary or the stable one), kind and final status (ok, or the "
               "error code).",
               ("model", "version", "kind", "status"), component="gateway"),
    MetricSpec("haif_gateway_admissions_total", "counter",
               "Admission decisions of the Gateways, by outcome.",
               ("outcome",), component="gateway"),
    MetricSpec("haif_quota_rejections_total", "counter",
               "Requests refused by a tenant's rate limit or quota, by tenant and reason.",
               ("tenant", "reason"), component="gateway"),
    MetricSpec("haif_quota_leases_total", "counter",
               "Quota leases of the Gateways (PostgreSQL): taken, and given back with units "
               "they did not hand out.",
               ("event",), component="gateway"),
    MetricSpec("haif_prompt_tokens_total", "counter",
               "Prompt (input) tokens of settled requests, by model.",
               ("model",), component="gateway"),
    MetricSpec("haif_completion_tokens_total", "counter",
               "Completion (output) tokens of settled requests, by model.",
               ("model",), component="gateway"),
    # --- Orchestrator ------------------------------------------------------------------
    MetricSpec("haif_in_flight_requests", "gauge",
               "Requests the Orchestrators have dispatched to workers and not yet finished.",
               ("model",), component="orchestrator"),
    MetricSpec("haif_workers", "gauge",
               "Worker actors by model, version and state (pending, loading, ready, draining, "
               "failed, dead).",
               ("model", "version", "state"), component="orchestrator"),
    MetricSpec("haif_rollout_weight", "gauge",
               "The share of a model's new requests each of its versions gets (percent).",
               ("model", "version"), merge="max", component="orchestrator"),
    MetricSpec("haif_rollout_auto_rollbacks_total", "counter",
               "Canaries the Orchestrator rolled back on its own (rollouts.max_error_rate).",
               ("model", "version"), component="orchestrator"),
    MetricSpec("haif_autoscale_decisions_total", "counter",
               "The autoscaler's decisions to add (up) or drain (down) workers, by model.",
               ("model", "direction"), component="orchestrator"),
    MetricSpec("haif_queue_depth", "gauge",
               "Requests waiting in the Orchestrators' queues for a worker, by model.",
               ("model",), component="orchestrator"),
    MetricSpec("haif_circuit_state", "gauge",
               "Circuit breaker of each worker: 0 closed, 1 half-open, 2 open (worst across "
               "Orchestrator replicas).",
               ("model", "worker"), merge="max", component="orchestrator"),
    MetricSpec("haif_dlq_depth", "gauge",
               "Entries waiting in the dead-letter queue.",
               (), merge="max", component="orchestrator"),
    # --- Worker actors -----------------------------------------------------------------
    MetricSpec("haif_worker_in_flight_requests", "gauge",
               "Requests being executed by worker actors, by model.",
               ("model",), component="worker"),
    MetricSpec("haif_artifact_cache_hits_total", "counter",
               "Artifact blobs a worker found verified in its node cache, by model.",
               ("model",), component="worker"),
    MetricSpec("haif_artifact_cache_misses_total", "counter",
               "Artifact blobs a worker had to fetch from a replica, by model.",
               ("model",), component="worker"),
    MetricSpec("haif_adapter_loads_total", "counter",
               "LoRA adapters a worker pulled, verified and loaded on first use, by base model.",
               ("model",), component="worker"),
    MetricSpec("haif_adapter_evictions_total", "counter",
               "LoRA adapters a worker unloaded to make room (least recently used), by base model.",
               ("model",), component="worker"),
    MetricSpec("haif_adapter_cache_hits_total", "counter",
               "Requests for a LoRA adapter that found it loaded on their worker, by base model.",
               ("model",), component="worker"),
    # --- the pipeline itself -------------------------------------------------------------
    MetricSpec("haif_metrics_processes", "gauge",
               "Processes whose metrics are fresh in the aggregator, by component.",
               ("component",), component="aggregator"),
)

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOG}


def exported_names() -> frozenset[str]:
    """Every series name /metrics can contain (histograms as _bucket/_sum/_count)."""
    return frozenset(n for spec in CATALOG for n in spec.series_names())
