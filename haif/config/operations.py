"""Running the service: quotas, jobs and idempotency, usage export, resilience, rollouts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from haif.config._base import ConfigModel


class QuotasConfig(ConfigModel):
    rate_limit_backend: Literal["auto", "redis", "database"] = Field(
        "auto", description="Where requests-per-minute are counted; auto: Redis when redis.url is set."
    )
    prompt_bytes_per_token: float = Field(
        4.0, gt=0, le=64,
        description="Prompt estimate for token reservations (bytes per token); settlement corrects it.",
    )
    redis_unavailable: Literal["database", "reject"] = Field(
        "database",
        description="Redis down: count requests per minute in the metadata store instead (database) "
        "or refuse requests with 503 (reject).",
    )
    redis_retry_after_s: float = Field(
        5.0, ge=0, le=600,
        description="After Redis failed, how long the fallback is used before Redis is tried again.",
    )
    lease_fraction: float = Field(
        0.02, ge=0, le=0.25,
        description="PostgreSQL: the share of each of a tenant's limits one Gateway replica may lease "
        "at once, to admit requests with no database round trip (0: every request is counted on its own).",
    )
    lease_max_requests: int = Field(
        256, ge=2, le=1_000_000, description="Most requests one lease hands out."
    )
    lease_idle_s: float = Field(
        0.5, gt=0, le=60, description="A lease unused this long gives back what it did not hand out."
    )
    lease_max_s: float = Field(5.0, gt=0, le=59, description="Longest life of a lease.")


class JobsConfig(ConfigModel):
    idempotency_ttl_s: float = Field(
        86_400.0, ge=60, le=30 * 86_400, description="How long an Idempotency-Key is remembered."
    )
    max_idempotency_key_chars: int = Field(
        255, ge=8, le=255, description="Longest accepted Idempotency-Key header."
    )
    idempotency_poll_ms: float = Field(
        50.0, ge=1, le=10_000, description="Poll interval of a duplicate waiting for the first execution."
    )
    max_stored_response_bytes: int = Field(
        16 * 1024**2, ge=1024, le=1024**3,
        description="Largest response kept for Idempotency-Key replays (larger: 413 on such requests).",
    )
    mark_running_after_s: float = Field(
        1.0, ge=0.05, le=600,
        description="Jobs still executing after this long are marked running (in batches, off the hot path).",
    )
    stale_after_s: float = Field(
        60.0, ge=1, le=86_400,
        description="Unsettled jobs older than request_timeout_s plus this are failed and their quota released.",
    )
    sweep_interval_s: float = Field(5.0, ge=0.1, le=3600, description="Background job upkeep period.")
    settle_queue_max: int = Field(
        100_000, ge=1, le=10_000_000,
        description="Settlements (and DLQ entries) a Gateway replica keeps to retry while the store is down.",
    )
    settle_retry_initial_s: float = Field(
        0.1, gt=0, le=60, description="First retry delay of a settlement the store refused (doubles, with jitter)."
    )
    settle_retry_max_s: float = Field(5.0, gt=0, le=600, description="Largest settlement retry delay.")


class UsageConfig(ConfigModel):
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", description="Billing webhook that receives usage batches (POST, JSON)."
    )
    batch_size: int = Field(500, ge=1, le=100_000, description="Usage records per webhook batch.")
    interval_s: float = Field(5.0, ge=0.05, le=3600, description="How often new usage is batched and sent.")
    timeout_s: float = Field(10.0, gt=0, le=300, description="Deadline of one webhook POST.")
    backoff_initial_s: float = Field(0.5, gt=0, le=600, description="First retry delay (doubles, with jitter).")
    backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Largest retry delay.")
    lease_s: float = Field(
        120.0, gt=0, le=86_400, description="A batch claimed by an exporter that died is re-sent after this."
    )


class ResilienceConfig(ConfigModel):
    health_check_period_s: float = Field(
        1.0, ge=0.05, le=300, description="How often the Orchestrator probes each worker."
    )
    health_check_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A probe that takes longer counts as failed."
    )
    unhealthy_after_failures: int = Field(
        5, ge=1, le=1000, description="Failed probes in a row after which a worker is replaced."
    )
    breaker_failure_threshold: int = Field(
        3, ge=1, le=1000, description="Failures in a row that open a worker's circuit breaker."
    )
    breaker_open_s: float = Field(
        5.0, gt=0, le=3600, description="How long an open breaker refuses work before a trial call."
    )
    breaker_half_open_calls: int = Field(
        1, ge=1, le=1000, description="Trial calls a half-open breaker lets through."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Tries per request (the first plus retries), within its deadline."
    )
    retry_backoff_initial_ms: float = Field(
        20.0, ge=0, le=60_000, description="Backoff cap before the first retry (full jitter)."
    )
    retry_backoff_max_ms: float = Field(
        1000.0, ge=0, le=600_000, description="Largest backoff cap between retries."
    )
    replace_dead_workers: bool = Field(True, description="Start a new worker in place of a dead one.")
    replacement_backoff_max_s: float = Field(
        30.0, ge=0, le=3600,
        description="Largest wait before replacing a worker that keeps dying (doubles per death).",
    )
    overloaded_retry_after_s: float = Field(
        1.0, gt=0, le=3600, description="Retry-After sent with 429 when a model's queue is full."
    )
    routing_table_refresh_s: float = Field(
        1.0, ge=0.05, le=300,
        description=(
            "Longest wait of a Gateway's long-poll for the routing table: a change (a worker "
            "ready, dead, added) comes at once; the workers' load figures at least this often."
        ),
    )


class RolloutsConfig(ConfigModel):
    poll_s: float = Field(
        1.0, gt=0, le=600,
        description="How often the Orchestrator reads the rollouts and drain requests of the metadata store.",
    )
    max_error_rate: float | None = Field(
        None, gt=0, le=1,
        description="A canary whose platform-error rate over `window_s` exceeds this (with at least "
        "`min_requests` requests) is rolled back on its own. Unset: never automatically.",
    )
    min_requests: int = Field(20, ge=1, le=1_000_000, description="Requests a canary needs in the window before it is judged.")
    window_s: float = Field(60.0, gt=0, le=86_400, description="The sliding window of the canary's error rate.")
