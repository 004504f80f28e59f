"""The two writes of a request: reservation before dispatch, settlement after it.

``reserve`` runs in one transaction: it locks the tenant's quota row (``SELECT ...
FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` serializes writers the same way), rolls
the windows, checks the limits, claims the Idempotency-Key, takes the reservation
and inserts the job. Any refusal rolls all of it back. ``settle`` moves the job to
its final state only if it is still open (so a job is settled exactly once, even
against the stale-job sweeper), refunds what was reserved and not used, releases the
concurrency slot and records the usage of what was served.

Tenants without limits take no lock: their reservation is the job insert alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from haif.exceptions import Conflict
from haif.store.models import OPEN_STATES, RETRYABLE_STATES, Job, JobState, Quota, UsageRecord
from haif.store.quotas import Ask, Counters, QuotaLimits, ask_for, check, check_requests

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


# Core tables, not ORM entities: the hot path skips the ORM's statement machinery.
jobs = Job.__table__
quotas = Quota.__table__
usage_records = UsageRecord.__table__


@dataclass(frozen=True)
class JobRequest:
    """Everything the reservation needs to know about one admitted request."""

    job_id: str
    tenant_id: int
    token_id: int | None
    kind: str
    model: str
    version: str
    tokens: int  # reservation: max_tokens per prompt + prompt estimate
    limits: QuotaLimits  # as cached with the token; only says whether to take the lock
    count_requests: bool  # requests per minute are counted here (no Redis)
    idempotency_key: str | None = None
    request_hash: str | None = None
    gateway: str | None = None
    region: str | None = None
    user: str | None = None  # the request's `user` (its end user), recorded on the job
    caller: str | None = None  # who authenticated: ``token:ID`` or ``oidc:ISSUER#SUB``


@dataclass(frozen=True)
class Reservation:
    job_id: str
    tenant_id: int
    model: str
    version: str
    reserved_at: datetime
    reserved_tokens: int  # counted in the token windows (0 when the tenant has no token limit)
    holds_slot: bool  # counted in quotas.in_flight
    # Admitted on a Gateway's quota lease: its job row's record (haif.gateway.lease.JobRecord),
    # written late or by settlement itself. None: the row was written with the reservation.
    recorded: Any = field(default=None, compare=False, repr=False)

    @property
    def holds_quota(self) -> bool:
        return self.reserved_tokens > 0 or self.holds_slot


@dataclass(frozen=True)
class Existing:
    """The job an Idempotency-Key already names (not failed): replay it, or wait for it."""

    job_id: str
    state: str
    response: str | None


@dataclass(frozen=True)
class Outcome:
    state: JobState
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None  # None: keep what the row holds
    error: str | None = None
    response: str | None = None  # kept only for Idempotency-Key replays
    bill: bool = False  # record usage: tokens were served
    attempts: int = 1  # dispatches, retries included
    region: str | None = None  # where it ran; None: keep the admitting region
    version: str | None = None  # the version that ran it; None: the one it was admitted with


def _insert(conn: Connection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(jobs)


def _clamp0(expr: Any) -> Any:
    return case((expr < 0, 0), else_=expr)


def _needs_lock(limits: QuotaLimits, count_requests: bool) -> bool:
    return (
        limits.counts_tokens
        or limits.max_concurrent is not None
        or (count_requests and limits.requests_per_minute is not None)
    )


# The hot statements are built once; a request only binds its values.
_LOCK_QUOTA = select(quotas).where(quotas.c.tenant_id == bindparam("b_tenant")).with_for_update()
_WRITE_COUNTERS = (
    update(quotas)
    .where(quotas.c.tenant_id == bindparam("b_tenant"))
    .values(
        minute_started_at=bindparam("b_minute_started_at"),
        minute_requests=bindparam("b_minute_requests"),
        minute_tokens=bindparam("b_minute_tokens"),
        day_started_at=bindparam("b_day_started_at"),
        day_tokens=bindparam("b_day_tokens"),
        in_flight=bindparam("b_in_flight"),
        updated_at=bindparam("b_now"),
    )
)
_INSERT_JOB = insert(jobs)
_CLOSE_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_job"), jobs.c.state.in_(OPEN_STATES))
    .values(
        state=bindparam("b_state"),
        prompt_tokens=bindparam("b_prompt"),
        completion_tokens=bindparam("b_completion"),
        started_at=bindparam("b_started"),
        finished_at=bindparam("b_finished"),
        worker=func.coalesce(bindparam("b_worker"), jobs.c.worker),
        region=func.coalesce(bindparam("b_region"), jobs.c.region),
        version=bindparam("b_version"),
        attempts=bindparam("b_attempts"),
        error=bindparam("b_error"),
        response=bindparam("b_response"),
    )
)
# Refunds go only into the window the reservation was taken from: a window that has
# closed since has nothing left to refund.
_SAME_MINUTE = quotas.c.minute_started_at <= bindparam("b_reserved_at")
_SAME_DAY = quotas.c.day_started_at <= bindparam("b_reserved_at")
_RELEASE = (
    update(quotas)
    .where(quotas.c.tenant_id == bindparam("b_tenant"))
    .values(
        minute_tokens=case(
            (_SAME_MINUTE, _clamp0(quotas.c.minute_tokens - bindparam("b_refund"))),
            else_=quotas.c.minute_tokens,
        ),
        day_tokens=case(
            (_SAME_DAY, _clamp0(quotas.c.day_tokens - bindparam("b_refund"))),
            else_=quotas.c.day_tokens,
        ),
        in_flight=_clamp0(quotas.c.in_flight - bindparam("b_slot")),
    )
)
_INSERT_USAGE = insert(usage_records)


def _lock_quota(conn: Connection, tenant_id: int) -> Any:
    return conn.execute(_LOCK_QUOTA, {"b_tenant": tenant_id}).one_or_none()


def reserve(conn: Connection, req: JobRequest, now: datetime) -> Reservation | Existing:
    """Admit ``req`` against its tenant's quota and record its job, or refuse it.

    Raises:
        RateLimited / QuotaExceeded / UnprocessableRequest: a limit refuses it.
        Conflict: its Idempotency-Key was used with a different request.
    """
    limits, counters = QuotaLimits(), None
    if _needs_lock(req.limits, req.count_requests):
        row = _lock_quota(conn, req.tenant_id)
        if row is not None:
            limits, counters = QuotaLimits.from_row(row), Counters.from_row(row).rolled(now)
    ask = ask_for(limits, tokens=req.tokens, count_requests=req.count_requests)
    if counters is not None and ask.requests:
        check_requests(limits, counters, now)

    job_values = {
        "id": req.job_id,
        "tenant_id": req.tenant_id,
        "token_id": req.token_id,
        "kind": req.kind,
        "model": req.model,
        "version": req.version,
        "idempotency_key": req.idempotency_key,
        "request_hash": req.request_hash,
        "state": JobState.RESERVED.value,
        "reserved_tokens": ask.tokens,
        "holds_slot": ask.slot,
        "gateway": req.gateway,
        "region": req.region,
        "end_user": req.user,
        "caller": req.caller,
        "created_at": now,
    }
    job_id = req.job_id
    if req.idempotency_key is not None:
        claimed = conn.execute(
            _insert(conn)
            .values(**job_values)
            .on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
            .returning(jobs.c.id)  # a row back: ours (rowcount is not reliable for this insert)
        ).first()
        if claimed is None:
            existing = _take_over_or_existing(conn, req, job_values, now)
            if isinstance(existing, Existing):
                if counters is not None and ask.requests:  # a replay is a request too
                    _write_counters(
                        conn, req.tenant_id, counters.taken(Ask(ask.requests, 0, False)), now
                    )
                return existing
            job_id = existing
    if counters is not None:
        check(limits, counters, ask, now)  # a refusal rolls back the claim above too
        if ask.requests or ask.tokens or ask.slot:
            _write_counters(conn, req.tenant_id, counters.taken(ask), now)
    if req.idempotency_key is None:
        conn.execute(_INSERT_JOB, job_values)
    return Reservation(
        job_id=job_id,
        tenant_id=req.tenant_id,
        model=req.model,
        version=req.version,
        reserved_at=now,
        reserved_tokens=ask.tokens,
        holds_slot=ask.slot,
    )


def _take_over_or_existing(
    conn: Connection, req: JobRequest, values: dict[str, Any], now: datetime
) -> Existing | str:
    row = conn.execute(
        select(jobs.c.id, jobs.c.state, jobs.c.request_hash, jobs.c.response).where(
            jobs.c.tenant_id == req.tenant_id, jobs.c.idempotency_key == req.idempotency_key
        )
    ).one()
    if row.request_hash != req.request_hash:
        raise Conflict("this Idempotency-Key was already used with a different request")
    if row.state not in RETRYABLE_STATES:
        return Existing(row.id, row.state, row.response)
    # A failed (or dead-lettered) job was not billed: the retry runs it again, same job id.
    taken = conn.execute(
        update(jobs)
        .where(jobs.c.id == row.id, jobs.c.state == row.state)
        .values(
            state=JobState.RESERVED.value,
            token_id=values["token_id"],
            reserved_tokens=values["reserved_tokens"],
            holds_slot=values["holds_slot"],
            gateway=values["gateway"],
            end_user=values["end_user"],
            caller=values["caller"],
            created_at=now,
            started_at=None,
            finished_at=None,
            prompt_tokens=None,
            completion_tokens=None,
            worker=None,
            attempts=1,
            error=None,
            response=None,
        )
    ).rowcount
    if not taken:  # another request took it over first: wait for that one
        return Existing(row.id, JobState.RESERVED.value, None)
    return row.id


def _write_counters(conn: Connection, tenant_id: int, c: Counters, now: datetime) -> None:
    conn.execute(
        _WRITE_COUNTERS,
        {
            "b_tenant": tenant_id,
            "b_minute_started_at": c.minute_started_at,
            "b_minute_requests": c.minute_requests,
            "b_minute_tokens": c.minute_tokens,
            "b_day_started_at": c.day_started_at,
            "b_day_tokens": c.day_tokens,
            "b_in_flight": c.in_flight,
            "b_now": now,
        },
    )


def close_job_params(res: Reservation, out: Outcome) -> dict[str, Any]:
    """The bind parameters that close a job row (also the start of the fast path's)."""
    return {
        "b_job": res.job_id,
        "b_state": out.state.value,
        "b_prompt": out.prompt_tokens,
        "b_completion": out.completion_tokens,
        "b_started": out.started_at,
        "b_finished": out.finished_at,
        "b_worker": out.worker,
        "b_region": out.region,
        "b_version": out.version or res.version,
        "b_attempts": out.attempts,
        "b_error": out.error,
        "b_response": out.response,
    }


def settle(conn: Connection, res: Reservation, out: Outcome) -> bool:
    """Close the job once: final state, refund, slot release, usage. False if already closed."""
    closed = conn.execute(_CLOSE_JOB, close_job_params(res, out)).rowcount
    if not closed:
        return False
    if res.holds_quota:
        charged = out.prompt_tokens + out.completion_tokens if out.bill else 0
        refund = (
            res.reserved_tokens - charged if res.reserved_tokens else 0
        )  # < 0: overdraft, charged
        conn.execute(
            _RELEASE,
            {
                "b_tenant": res.tenant_id,
                "b_reserved_at": res.reserved_at,
                "b_refund": refund,
                "b_slot": int(res.holds_slot),
            },
        )
    if out.bill:
        conn.execute(
            _INSERT_USAGE,
            {
                "job_id": res.job_id,
                "tenant_id": res.tenant_id,
                "model": res.model,
                "version": out.version or res.version,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "started_at": out.started_at or res.reserved_at,
                "finished_at": out.finished_at,
            },
        )
    return True


# --- upkeep, off the hot path ---------------------------------------------------------------


def mark_running(conn: Connection, job_ids: list[str], now: datetime) -> int:
    """Mark still-reserved jobs running (one statement for a batch)."""
    if not job_ids:
        return 0
    return conn.execute(
        update(jobs)
        .where(jobs.c.id.in_(job_ids), jobs.c.state == JobState.RESERVED.value)
        .values(state=JobState.RUNNING.value, started_at=now)
    ).rowcount


def stale_jobs(
    conn: Connection, older_than: datetime, limit: int = 100, exclude: set[str] | None = None
) -> list[Reservation]:
    """Open jobs reserved before ``older_than``: their Gateway died or lost them.

    ``exclude``: jobs known to be settling (filtered here: the set may be large).
    """
    exclude = exclude or set()
    rows = conn.execute(
        select(
            jobs.c.id,
            jobs.c.tenant_id,
            jobs.c.model,
            jobs.c.version,
            jobs.c.created_at,
            jobs.c.reserved_tokens,
            jobs.c.holds_slot,
        )
        .where(jobs.c.state.in_(OPEN_STATES), jobs.c.created_at < older_than)
        .order_by(jobs.c.created_at)
        .limit(limit + len(exclude))
    ).all()
    return [
        Reservation(
            r.id, r.tenant_id, r.model, r.version, r.created_at, r.reserved_tokens, r.holds_slot
        )
        for r in rows
        if r.id not in exclude
    ][:limit]


def forget_idempotency_keys(conn: Connection, older_than: datetime) -> int:
    """Free the Idempotency-Keys of closed jobs older than the retention time."""
    return conn.execute(
        update(jobs)
        .where(
            jobs.c.idempotency_key.is_not(None),
            jobs.c.created_at < older_than,
            jobs.c.state.not_in(OPEN_STATES),
        )
        .values(idempotency_key=None, response=None)
    ).rowcount


def job_age(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)


def usage_total(conn: Connection, tenant_id: int) -> tuple[int, int, int]:
    """(records, prompt tokens, completion tokens) recorded for a tenant."""
    row = conn.execute(
        select(
            func.count(usage_records.c.id),
            func.coalesce(func.sum(usage_records.c.prompt_tokens), 0),
            func.coalesce(func.sum(usage_records.c.completion_tokens), 0),
        ).where(usage_records.c.tenant_id == tenant_id)
    ).one()
    return int(row[0]), int(row[1]), int(row[2])
