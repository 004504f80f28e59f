"""The metadata store's tables, as SQLAlchemy 2 typed models.

::

    tenants ──┬── api_tokens      (hash of the secret, never the secret; looked up by prefix)
              ├── p2p_peers       (P2P callers: a Noise public key, mapped to its tenant)
              ├── quotas          (limits, and the live counters of their windows)
              ├── jobs            (one per admitted request: reserved → running → terminal)
              │     └── usage_records   (one per served job; exported in usage_batches)
              └── usage_records
    dead_letters                  (the DLQ's table: final failures, self-contained, keyed by job id)
    rollouts                      (per model: stable and canary versions, the canary's weight; CLI-written)
    worker_drains                 (`haif workers drain` requests, done by the Orchestrator)

The Alembic migrations in ``haif/store/migrations`` create exactly these tables (a test
compares them); change both together.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so that migrations can name what they drop on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every dialect (SQLite has no time zones: it stores UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobState(enum.StrEnum):
    RESERVED = "reserved"  # quota reserved, job dispatched or about to be
    RUNNING = "running"  # executing for longer than jobs.mark_running_after_s
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD_LETTERED})

# The state machine. A job shorter than mark_running_after_s is settled before it is
# ever marked running: reserved → succeeded is that same path with the middle unseen.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RESERVED: frozenset({JobState.RUNNING, *_TERMINAL}),
    JobState.RUNNING: frozenset(_TERMINAL),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.RESERVED}),  # an Idempotency-Key may retry a failed job
    JobState.DEAD_LETTERED: frozenset({JobState.RESERVED}),  # ... and `haif dlq replay` this one
}
OPEN_STATES = (JobState.RESERVED.value, JobState.RUNNING.value)
# Closed without being served: a retry with the same Idempotency-Key runs it again.
RETRYABLE_STATES = (JobState.FAILED.value, JobState.DEAD_LETTERED.value)


CALLER_CHARS = 600  # oidc:<issuer>#<sub>


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    suspended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # None: active


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128))
    scopes: Mapped[str] = mapped_column(String(256))  # space-separated
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)  # None: every model
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class P2PPeer(Base):
    """A P2P caller's Noise public key (64 lower-case hex) and the tenant it acts as."""

    __tablename__ = "p2p_peers"

    public_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Quota(Base):
    """A tenant's limits (NULL: unlimited) and the counters of their current windows."""

    __tablename__ = "quotas"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    minute_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    minute_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    minute_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    day_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    day_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        CheckConstraint(
            "state IN ('reserved', 'running', 'succeeded', 'failed', 'dead_lettered')", name="state"
        ),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_state_created", "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    holds_slot: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )  # counted in quotas.in_flight
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    worker: Mapped[str | None] = mapped_column(String(256))
    region: Mapped[str | None] = mapped_column(String(64))
    # Dispatches to workers, retries included. A server default only: the single-statement
    # reservation (haif.store.fastpath, sent precompiled by haif.store.aio) leaves it out.
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")
    gateway: Mapped[str | None] = mapped_column(String(128))  # the Gateway replica that admitted it
    end_user: Mapped[str | None] = mapped_column(String(256))  # the request's `user`, as the client named them
    caller: Mapped[str | None] = mapped_column(String(CALLER_CHARS))  # token:ID or oidc:ISSUER#SUB
    error: Mapped[str | None] = mapped_column(String(1024))
    response: Mapped[str | None] = mapped_column(Text)  # JSON, kept for Idempotency-Key replays
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)  # reserved at
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class UsageRecord(Base):
    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_tenant_finished", "tenant_id", "finished_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime)
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("usage_batches.id", ondelete="SET NULL"), index=True
    )


class UsageBatch(Base):
    """Usage records sent to the billing webhook together, under one id to de-duplicate on."""

    __tablename__ = "usage_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    records: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(String(1024))


class DeadLetter(Base):
    """A job that failed finally (the DLQ's table; Redis Streams hold the same entries).

    Self-contained on purpose (no foreign keys): an entry outlives what it names, and
    holds everything ``haif dlq replay`` needs to submit the request again.
    """

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_tenant_dead", "tenant", "dead_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the job id
    tenant_id: Mapped[int] = mapped_column(Integer)
    tenant: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))
    error_type: Mapped[str] = mapped_column(String(64))
    error_code: Mapped[str] = mapped_column(String(64))
    error: Mapped[str] = mapped_column(String(1024))
    attempts: Mapped[int] = mapped_column(Integer)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    traceparent: Mapped[str | None] = mapped_column(String(55))
    request_id: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)  # the job's reservation
    dead_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    body: Mapped[str] = mapped_column(Text)  # the request body, JSON
    body_truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class RolloutRow(Base):
    """A model's rollout: its stable version and a canary with a share of the traffic.

    The operator's CLI writes the versions and the weight (each change bumps
    ``generation``); the Orchestrator reads every row on each poll, applies them through the
    routing table, and writes ``canary_status`` and ``reason`` back for the generation it
    saw (:mod:`haif.store.rollouts`).
    """

    __tablename__ = "rollouts"
    __table_args__ = (
        CheckConstraint("canary_weight >= 0 AND canary_weight <= 100", name="canary_weight"),
    )

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The config's version of the model when the rollout began; a redeploy whose config
    # names another version makes the row stale (superseded).
    base_version: Mapped[str] = mapped_column(String(64))
    stable_version: Mapped[str] = mapped_column(String(64))
    canary_version: Mapped[str | None] = mapped_column(String(64))
    canary_weight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # percent
    canary_status: Mapped[str | None] = mapped_column(String(16))  # starting | ready | failed
    reason: Mapped[str | None] = mapped_column(Text)  # why the canary has no traffic, or was rolled back
    auto_rollbacks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class WorkerDrain(Base):
    """A request to drain one worker (``haif workers drain``); the Orchestrator marks it done."""

    __tablename__ = "worker_drains"

    worker_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    outcome: Mapped[str | None] = mapped_column(Text)


class AuditRow(Base):
    """One admin action: who did what to which target, the change (never a secret)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"), Index("ix_audit_log_action", "action"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(String(CALLER_CHARS))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    before: Mapped[dict | None] = mapped_column(JSON)
    after: Mapped[dict | None] = mapped_column(JSON)
    request_id: Mapped[str | None] = mapped_column(String(128))
    client: Mapped[str | None] = mapped_column(String(128))


class AuthChange(Base):
    """A change that must reach every Gateway's credential cache now (a revoked token, a
    suspended tenant): its id is the auth epoch the routing table carries to the replicas."""

    __tablename__ = "auth_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    what: Mapped[str] = mapped_column(String(256))
