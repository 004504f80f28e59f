"""Traces, metrics and logs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from haif.config._base import ConfigModel


class TelemetryConfig(ConfigModel):
    service_name: str = Field("haif", description="OpenTelemetry service name prefix.")
    otlp_endpoint: str | None = Field(None, description="OTLP endpoint; no export when unset.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    metrics_enabled: bool = Field(
        True, description="Record platform metrics and serve them at GET /metrics (503 when off)."
    )
    metrics_push_interval_s: float = Field(
        1.0, ge=0.05, le=60,
        description="How often each process pushes its cumulative metrics to the aggregator actor.",
    )
    metrics_stale_after_s: float = Field(
        10.0, ge=0.5, le=3600,
        description="Gauges of a process silent this long are dropped (its counters are kept).",
    )
    metrics_retire_after_s: float = Field(
        3600.0, ge=10, le=7 * 86_400,
        description="A process silent this long is folded into the totals and forgotten.",
    )
    metrics_max_processes: int = Field(
        4096, ge=16, le=1_000_000,
        description="Processes the aggregator tracks; beyond it the longest-silent are folded in.",
    )
    metrics_scrape_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Deadline of GET /metrics for the aggregator's answer (503 after)."
    )

    otlp_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None,
        description="OTLP transport; unset: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.",
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of new traces recorded; a client's traceparent sampled flag is followed.",
    )
    export_interval_ms: int | None = Field(
        None, ge=10, le=60_000,
        description="Delay between span exports; unset: OTEL_BSP_SCHEDULE_DELAY, else 5000.",
    )
    max_queued_spans: int | None = Field(
        None, ge=64, le=1_000_000,
        description="Spans a process buffers for export (then drops); unset: OTEL_BSP_MAX_QUEUE_SIZE, else 2048.",
    )
    json_logs: bool = Field(
        True, description="One JSON object per log line, with request id, trace id, span id, tenant."
    )

    @model_validator(mode="after")
    def _metrics_timing(self) -> TelemetryConfig:
        if self.metrics_stale_after_s < 2 * self.metrics_push_interval_s:
            raise ValueError(
                "telemetry.metrics_stale_after_s must be at least twice metrics_push_interval_s"
            )
        if self.metrics_retire_after_s <= self.metrics_stale_after_s:
            raise ValueError("telemetry.metrics_retire_after_s must exceed metrics_stale_after_s")
        return self
