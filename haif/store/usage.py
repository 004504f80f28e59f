"""Usage records: the tenant's view, the export, and batches for the billing webhook.

Batches give at-least-once delivery with de-duplication on the receiver's side: a
batch is built once (its records never change), claimed under a lease, and re-sent
under the same id until the receiver acknowledges it. An exporter that dies holding
a lease leaves the batch to whichever exporter finds the lease expired.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, insert, or_, select, update

from haif.store.models import Job, Tenant, UsageBatch, UsageRecord

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection

EXPORT_FIELDS = (
    "tenant",
    "model",
    "version",
    "job_id",
    "prompt_tokens",
    "completion_tokens",
    "started_at",
    "finished_at",
    "caller",  # who authenticated: token:ID, or oidc:ISSUER#SUB for a JWT (None before 0007)
)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def export_row(r: Any) -> dict[str, Any]:
    return {
        "tenant": r.tenant,
        "model": r.model,
        "version": r.version,
        "job_id": r.job_id,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "started_at": _iso(r.started_at),
        "finished_at": _iso(r.finished_at),
        "caller": r.caller,
    }


def _rows_query(since: datetime | None, tenant_id: int | None) -> Any:
    stmt = select(
        Tenant.name.label("tenant"),
        UsageRecord.model,
        UsageRecord.version,
        UsageRecord.job_id,
        UsageRecord.prompt_tokens,
        UsageRecord.completion_tokens,
        UsageRecord.started_at,
        UsageRecord.finished_at,
        UsageRecord.id,
        Job.caller,
    ).join(Tenant, Tenant.id == UsageRecord.tenant_id).outerjoin(Job, Job.id == UsageRecord.job_id)
    if since is not None:
        stmt = stmt.where(UsageRecord.finished_at >= since)
    if tenant_id is not None:
        stmt = stmt.where(UsageRecord.tenant_id == tenant_id)
    return stmt


def export_rows(
    conn: Connection, since: datetime | None = None, tenant_id: int | None = None, page: int = 1000
) -> Iterator[dict[str, Any]]:
    """Every usage record (one per served job), oldest first, in pages (keyset on id)."""
    last = 0
    while True:
        stmt = (
            _rows_query(since, tenant_id)
            .where(UsageRecord.id > last)
            .order_by(UsageRecord.id)
            .limit(page)
        )
        rows = conn.execute(stmt).all()
        for r in rows:
            yield export_row(r)
        if len(rows) < page:
            return
        last = rows[-1].id


def tenant_usage(
    conn: Connection, tenant_id: int, since: datetime | None, limit: int
) -> list[dict[str, Any]]:
    stmt = _rows_query(since, tenant_id).order_by(UsageRecord.id.desc()).limit(limit)
    return [export_row(r) for r in conn.execute(stmt).all()]


# What a tenant sees of its own jobs (GET /v1/jobs and /v1/jobs/{id}).
_JOB_COLUMNS = (
    Job.id,
    Job.kind,
    Job.model,
    Job.version,
    Job.state,
    Job.prompt_tokens,
    Job.completion_tokens,
    Job.attempts,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.error,
    Job.end_user,
)


def tenant_job(conn: Connection, tenant_id: int, job_id: str) -> dict[str, Any] | None:
    """A job of this tenant (None for another tenant's job: callers answer 404 either way)."""
    row = conn.execute(
        select(*_JOB_COLUMNS).where(Job.id == job_id, Job.tenant_id == tenant_id)
    ).one_or_none()
    return _job(row) if row is not None else None


def tenant_jobs(conn: Connection, tenant_id: int, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(*_JOB_COLUMNS)
        .where(Job.tenant_id == tenant_id)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
    ).all()
    return [_job(r) for r in rows]


def _job(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "object": "job",
        "kind": r.kind,
        "model": r.model,
        "version": r.version,
        "state": r.state,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "attempts": r.attempts,
        "created_at": _iso(r.created_at),
        "started_at": _iso(r.started_at) if r.started_at else None,
        "finished_at": _iso(r.finished_at) if r.finished_at else None,
        "error": r.error,
        "user": r.end_user,
    }


# --- webhook batches ------------------------------------------------------------------------


def claim_batch(
    conn: Connection, now: datetime, lease_s: float, size: int
) -> tuple[str, list[dict[str, Any]]] | None:
    """An undelivered batch whose lease is free, else a new one of unbatched records.

    The batch is leased to the caller for ``lease_s``.
    """
    lease = now + timedelta(seconds=lease_s)
    free = or_(UsageBatch.lease_until.is_(None), UsageBatch.lease_until < now)
    stmt = (
        select(UsageBatch.id)
        .where(UsageBatch.delivered_at.is_(None), free)
        .order_by(UsageBatch.created_at)
        .limit(1)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    batch_id = conn.execute(stmt).scalar_one_or_none()
    if batch_id is not None:
        conn.execute(update(UsageBatch).where(UsageBatch.id == batch_id).values(lease_until=lease))
    else:
        pick = (
            select(UsageRecord.id)
            .where(UsageRecord.batch_id.is_(None))
            .order_by(UsageRecord.id)
            .limit(size)
        )
        if conn.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        ids = list(conn.execute(pick).scalars())
        if not ids:
            return None
        batch_id = f"ub_{uuid.uuid4().hex}"
        conn.execute(
            insert(UsageBatch).values(
                id=batch_id, created_at=now, records=len(ids), attempts=0, lease_until=lease
            )
        )
        conn.execute(update(UsageRecord).where(UsageRecord.id.in_(ids)).values(batch_id=batch_id))
    rows = conn.execute(
        _rows_query(None, None).where(UsageRecord.batch_id == batch_id).order_by(UsageRecord.id)
    ).all()
    return batch_id, [export_row(r) for r in rows]


def record_attempt(
    conn: Connection,
    batch_id: str,
    *,
    delivered: bool,
    error: str | None,
    now: datetime,
    lease_s: float,
) -> None:
    values: dict[str, Any] = {"attempts": UsageBatch.attempts + 1, "last_error": error}
    if delivered:
        values["delivered_at"] = now
        values["lease_until"] = None
    else:
        values["lease_until"] = now + timedelta(seconds=lease_s)  # keep it while retrying
    conn.execute(update(UsageBatch).where(UsageBatch.id == batch_id).values(**values))


def pending_records(conn: Connection) -> int:
    """Records not yet acknowledged by the webhook."""
    return int(
        conn.execute(
            select(func.count(UsageRecord.id))
            .outerjoin(UsageBatch, UsageBatch.id == UsageRecord.batch_id)
            .where(or_(UsageRecord.batch_id.is_(None), and_(UsageBatch.delivered_at.is_(None))))
        ).scalar_one()
    )
