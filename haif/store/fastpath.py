"""The common request's reservation and settlement, each in a single statement.

``ledger.reserve`` and ``ledger.settle`` are the reference: a transaction that locks
the tenant's quota row, decides in Python, and writes. Here the same decisions are
made by the database inside one conditional ``UPDATE``: PostgreSQL re-evaluates its
``WHERE`` on the locked, current row, so concurrent reservations serialize on the row
exactly as under ``SELECT ... FOR UPDATE``. On PostgreSQL the quota update and the job
insert (and, for settlement, the job close, the refund and the usage record) are one
statement in autocommit: one round trip, one commit. SQLite runs the same statements
one after the other in its (already serialized) transaction.

Requests with an Idempotency-Key, and refusals, take the reference path: a refusal is
re-examined there so that its reason and Retry-After are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    bindparam,
    case,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    update,
)

from haif.store import ledger
from haif.store.ledger import (
    OPEN_STATES,
    Existing,
    JobRequest,
    Outcome,
    Reservation,
    _clamp0,
    _needs_lock,
    jobs,
    quotas,
    usage_records,
)
from haif.store.models import JobState, UtcDateTime
from haif.store.quotas import DAY, MINUTE

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.engine import Connection

    from haif.store.db import Database

q = quotas.c
_NOW = bindparam("b_now", type_=UtcDateTime())
_MINUTE_ROLLED = or_(
    q.minute_started_at.is_(None),
    q.minute_started_at <= bindparam("b_minute_cutoff", type_=UtcDateTime()),
)
_DAY_ROLLED = or_(
    q.day_started_at.is_(None), q.day_started_at <= bindparam("b_day_cutoff", type_=UtcDateTime())
)
_COUNT_REQUESTS = bindparam(
    "b_count_requests", type_=Integer()
)  # 1: requests per minute counted here
# What this request takes, by the row's own limits (as ``quotas.ask_for`` does).
_REQ = case((q.requests_per_minute.is_not(None), _COUNT_REQUESTS), else_=0)
_TOKENS = case(
    (
        or_(q.tokens_per_minute.is_not(None), q.tokens_per_day.is_not(None)),
        bindparam("b_tokens", type_=BigInteger()),
    ),
    else_=0,
)
_SLOT = case((q.max_concurrent.is_not(None), 1), else_=0)
_MINUTE_REQUESTS = case((_MINUTE_ROLLED, 0), else_=q.minute_requests) + _REQ
_MINUTE_TOKENS = case((_MINUTE_ROLLED, 0), else_=q.minute_tokens) + _TOKENS
_DAY_TOKENS = case((_DAY_ROLLED, 0), else_=q.day_tokens) + _TOKENS
_IN_FLIGHT = q.in_flight + _SLOT

def _take(lease: bool) -> Any:
    """The conditional quota update of one request, or of a lease (``lease=True``).

    A request takes ``b_count_requests`` (0 or 1) and ``b_tokens``, and its concurrency
    slot. A lease takes a block of requests and tokens for a Gateway replica to hand out
    (``haif.gateway.lease``): only while at least as much again is left (it never takes
    the last half of a window), never a slot, and only from a tenant without a
    concurrency limit (a stale cache of the limits cannot leak a slot).
    """
    margin_requests = _REQ if lease else 0
    margin_tokens = _TOKENS if lease else 0
    slot = literal(0) if lease else _SLOT
    stmt = (
        update(quotas)
        .where(
            q.tenant_id == bindparam("b_tenant", type_=Integer()),
            or_(
                q.requests_per_minute.is_(None),
                _COUNT_REQUESTS == 0,
                _MINUTE_REQUESTS + margin_requests <= q.requests_per_minute,
            ),
            or_(q.tokens_per_minute.is_(None), _MINUTE_TOKENS + margin_tokens <= q.tokens_per_minute),
            or_(q.tokens_per_day.is_(None), _DAY_TOKENS + margin_tokens <= q.tokens_per_day),
            q.max_concurrent.is_(None) if lease else or_(
                q.max_concurrent.is_(None), _IN_FLIGHT <= q.max_concurrent
            ),
        )
        .values(
            minute_started_at=case((_MINUTE_ROLLED, _NOW), else_=q.minute_started_at),
            minute_requests=_MINUTE_REQUESTS,
            minute_tokens=_MINUTE_TOKENS,
            day_started_at=case((_DAY_ROLLED, _NOW), else_=q.day_started_at),
            day_tokens=_DAY_TOKENS,
            in_flight=q.in_flight + slot,
            updated_at=_NOW,
        )
    )
    # Limits are not updated: these read the same in the new row.
    if lease:
        return stmt.returning(
            _REQ.label("requests"),
            _TOKENS.label("tokens"),
            q.minute_started_at,
            q.day_started_at,
        )
    return stmt.returning(
        q.tenant_id, _TOKENS.label("reserved_tokens"), (_SLOT == 1).label("holds_slot")
    )


_TAKE = _take(lease=False)
_TAKE_LEASE = _take(lease=True)

# What a lease did not hand out goes back, to the windows it was counted in: those whose
# start is still the one the lease's take returned (a window that rolled since has
# forgotten it anyway). The start, not the lease's own clock: a concurrent request of
# another replica may have opened the window with a slightly later clock.
_SAME_MINUTE = q.minute_started_at == bindparam("b_minute_start", type_=UtcDateTime())
_SAME_DAY = q.day_started_at == bindparam("b_day_start", type_=UtcDateTime())
_RETURN_LEASE = (
    update(quotas)
    .where(q.tenant_id == bindparam("b_tenant", type_=Integer()))
    .values(
        minute_requests=case(
            (
                _SAME_MINUTE,
                _clamp0(q.minute_requests - bindparam("b_requests", type_=Integer())),
            ),
            else_=q.minute_requests,
        ),
        minute_tokens=case(
            (
                _SAME_MINUTE,
                _clamp0(q.minute_tokens - bindparam("b_tokens", type_=BigInteger())),
            ),
            else_=q.minute_tokens,
        ),
        day_tokens=case(
            (
                _SAME_DAY,
                _clamp0(q.day_tokens - bindparam("b_tokens", type_=BigInteger())),
            ),
            else_=q.day_tokens,
        ),
    )
)

_JOB_FIELDS = (
    "id",
    "tenant_id",
    "token_id",
    "kind",
    "model",
    "version",
    "state",
    "reserved_tokens",
    "holds_slot",
    "gateway",
    "region",
    "end_user",
    "caller",
    "created_at",
)


def _reserve_pg() -> Any:
    taken = _TAKE.cte("taken")
    row = select(
        bindparam("b_job", type_=String()),
        taken.c.tenant_id,
        bindparam("b_token", type_=Integer()),
        bindparam("b_kind", type_=String()),
        bindparam("b_model", type_=String()),
        bindparam("b_version", type_=String()),
        literal(JobState.RESERVED.value),
        taken.c.reserved_tokens,
        taken.c.holds_slot,
        bindparam("b_gateway", type_=String()),
        bindparam("b_region", type_=String()),
        bindparam("b_user", type_=String()),
        bindparam("b_caller", type_=String()),
        _NOW,
    )
    return (
        insert(jobs)
        .from_select(list(_JOB_FIELDS), row)
        .returning(jobs.c.reserved_tokens, jobs.c.holds_slot)
    )


_RESERVE_PG = _reserve_pg()


def _job_values(reserved_tokens: Any) -> dict[str, Any]:
    """A reserved job's row, from the request's bind parameters."""
    return {
        "id": bindparam("b_job", type_=String()),
        "tenant_id": bindparam("b_tenant", type_=Integer()),
        "token_id": bindparam("b_token", type_=Integer()),
        "kind": bindparam("b_kind", type_=String()),
        "model": bindparam("b_model", type_=String()),
        "version": bindparam("b_version", type_=String()),
        "state": literal(JobState.RESERVED.value),
        "reserved_tokens": reserved_tokens,
        "holds_slot": False,
        "gateway": bindparam("b_gateway", type_=String()),
        "region": bindparam("b_region", type_=String()),
        "end_user": bindparam("b_user", type_=String()),
        "caller": bindparam("b_caller", type_=String()),
        "created_at": _NOW,
    }


_INSERT_JOB = insert(jobs).values(**_job_values(0))


def _record_job_pg() -> Any:
    """The open job row of a request admitted on a lease that outlives its row's delay,
    written off the request's path (a second write changes nothing)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    return (
        pg_insert(jobs)
        .values(**_job_values(bindparam("b_tokens", type_=BigInteger())))
        .on_conflict_do_nothing(index_elements=[jobs.c.id])
    )


_RECORD_JOB_PG = _record_job_pg()


def _params(req: JobRequest, now: datetime) -> dict[str, Any]:
    return {
        "b_tenant": req.tenant_id,
        "b_now": now,
        "b_minute_cutoff": now - MINUTE,
        "b_day_cutoff": now - DAY,
        "b_count_requests": int(req.count_requests),
        "b_tokens": req.tokens,
        "b_job": req.job_id,
        "b_token": req.token_id,
        "b_kind": req.kind,
        "b_model": req.model,
        "b_version": req.version,
        "b_gateway": req.gateway,
        "b_region": req.region,
        "b_user": req.user,
        "b_caller": req.caller,
    }


def _job_params(req: JobRequest, now: datetime) -> dict[str, Any]:
    return {
        "b_job": req.job_id,
        "b_tenant": req.tenant_id,
        "b_token": req.token_id,
        "b_kind": req.kind,
        "b_model": req.model,
        "b_version": req.version,
        "b_gateway": req.gateway,
        "b_region": req.region,
        "b_user": req.user,
        "b_caller": req.caller,
        "b_now": now,
    }


def _job_row(
    req: JobRequest, now: datetime, reserved_tokens: int, holds_slot: bool
) -> dict[str, Any]:
    return {
        "id": req.job_id,
        "tenant_id": req.tenant_id,
        "token_id": req.token_id,
        "kind": req.kind,
        "model": req.model,
        "version": req.version,
        "state": JobState.RESERVED.value,
        "reserved_tokens": reserved_tokens,
        "holds_slot": holds_slot,
        "gateway": req.gateway,
        "region": req.region,
        "end_user": req.user,
        "caller": req.caller,
        "created_at": now,
    }


def reserve(conn: Connection, req: JobRequest, now: datetime) -> Reservation | None:
    """Reserve and record the job of a request without an Idempotency-Key.

    Returns None when the reference path must decide: the quota refused (it will say
    why, exactly) or the tenant has no quota row. ``conn``: autocommit on PostgreSQL,
    a transaction on SQLite.
    """
    if req.idempotency_key is not None:
        return None
    if not _needs_lock(req.limits, req.count_requests):  # no limits: the job insert is all
        conn.execute(_INSERT_JOB, _job_params(req, now))
        return _reservation(req, now, 0, False)
    if conn.dialect.name == "postgresql":
        row = conn.execute(_RESERVE_PG, _params(req, now)).first()
    else:
        row = conn.execute(_TAKE, _params(req, now)).first()
        if row is not None:
            conn.execute(
                insert(jobs), _job_row(req, now, row.reserved_tokens, bool(row.holds_slot))
            )
    if row is None:
        return None
    return _reservation(req, now, int(row.reserved_tokens), bool(row.holds_slot))


def _reservation(
    req: JobRequest, now: datetime, tokens: int, slot: bool, recorded: Any = None
) -> Reservation:
    return Reservation(
        job_id=req.job_id,
        tenant_id=req.tenant_id,
        model=req.model,
        version=req.version,
        reserved_at=now,
        reserved_tokens=tokens,
        holds_slot=slot,
        recorded=recorded,
    )


# --- settlement: PostgreSQL, one statement -----------------------------------------------------

# Inline (not an expanding IN), so that the statement compiles once to fixed SQL.
_OPEN = jobs.c.state.in_([literal_column(f"'{state}'") for state in OPEN_STATES])


def _closing_values(worker: Any, region: Any) -> dict[str, Any]:
    """What settlement writes on a job row (``ledger.close_job_params``); ``worker`` and
    ``region`` are kept where the outcome has none."""
    return {
        "state": bindparam("b_state", type_=String()),
        "prompt_tokens": bindparam("b_prompt", type_=BigInteger()),
        "completion_tokens": bindparam("b_completion", type_=BigInteger()),
        "started_at": bindparam("b_started", type_=UtcDateTime()),
        "finished_at": bindparam("b_finished", type_=UtcDateTime()),
        "worker": func.coalesce(bindparam("b_worker", type_=String()), worker),
        "region": func.coalesce(bindparam("b_region", type_=String()), region),
        "version": bindparam("b_version", type_=String()),
        "attempts": bindparam("b_attempts", type_=Integer()),
        "error": bindparam("b_error", type_=String()),
        "response": bindparam("b_response", type_=String()),
    }


def _closed_row() -> Any:
    """The row of a leased job that settles before its own row was written
    (``haif.gateway.lease.JobRecord``): inserted closed, unless it is there already (a
    retried settlement); only the insert that wrote it returns it."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    row = {
        **_job_values(bindparam("b_reserved", type_=BigInteger())),
        **_closing_values(null(), bindparam("b_job_region", type_=String())),
    }
    return (
        pg_insert(jobs)
        .values(**row)
        .on_conflict_do_nothing(index_elements=[jobs.c.id])
        .returning(jobs.c.id, jobs.c.tenant_id)
        .cte("closed")
    )


def _settle_pg(release: bool, bill: bool, written: bool = True) -> Any:
    """Close the job, refund what it did not use, record its usage: one statement.

    ``written=False``: the job has no row yet (a leased job shorter than its row's
    delay); the row is inserted closed instead of updated.
    """
    closed = _closed_row() if not written else (
        update(jobs)
        .where(jobs.c.id == bindparam("b_job", type_=String()), _OPEN)
        .values(**_closing_values(jobs.c.worker, jobs.c.region))
        .returning(jobs.c.id, jobs.c.tenant_id)
        .cte("closed")
    )
    stmt = select(func.count()).select_from(closed)
    if release:
        reserved_at = bindparam("b_reserved_at", type_=UtcDateTime())
        refund = bindparam("b_refund", type_=BigInteger())
        released = (
            update(quotas)
            .where(q.tenant_id == closed.c.tenant_id)
            .values(
                minute_tokens=case(
                    (q.minute_started_at <= reserved_at, _clamp0(q.minute_tokens - refund)),
                    else_=q.minute_tokens,
                ),
                day_tokens=case(
                    (q.day_started_at <= reserved_at, _clamp0(q.day_tokens - refund)),
                    else_=q.day_tokens,
                ),
                in_flight=_clamp0(q.in_flight - bindparam("b_slot", type_=Integer())),
            )
            .cte("released")
        )
        stmt = stmt.add_cte(released)
    if bill:
        used = select(
            closed.c.id,
            closed.c.tenant_id,
            bindparam("b_model", type_=String()),
            bindparam("b_version", type_=String()),
            bindparam("b_prompt", type_=BigInteger()),
            bindparam("b_completion", type_=BigInteger()),
            bindparam("b_usage_started", type_=UtcDateTime()),
            bindparam("b_finished", type_=UtcDateTime()),
        )
        recorded = (
            insert(usage_records)
            .from_select(
                [
                    "job_id",
                    "tenant_id",
                    "model",
                    "version",
                    "prompt_tokens",
                    "completion_tokens",
                    "started_at",
                    "finished_at",
                ],
                used,
            )
            .cte("recorded")
        )
        stmt = stmt.add_cte(recorded)
    return stmt


_SETTLE_PG = {(r, b): _settle_pg(r, b) for r in (False, True) for b in (False, True)}
_SETTLE_UNWRITTEN_PG = {
    (r, b): _settle_pg(r, b, written=False) for r in (False, True) for b in (False, True)
}


def settle_pg(conn: Connection, res: Reservation, out: Outcome) -> bool:
    """``ledger.settle`` as one statement (PostgreSQL, autocommit). False if already closed."""
    params = _settle_params(res, out)
    return bool(conn.execute(_SETTLE_PG[(res.holds_quota, out.bill)], params).scalar_one())


def _settle_params(res: Reservation, out: Outcome) -> dict[str, Any]:
    charged = out.prompt_tokens + out.completion_tokens if out.bill else 0
    return {
        **ledger.close_job_params(res, out),
        "b_reserved_at": res.reserved_at,
        "b_refund": res.reserved_tokens - charged if res.reserved_tokens else 0,
        "b_slot": int(res.holds_slot),
        "b_model": res.model,
        "b_version": out.version or res.version,
        "b_usage_started": out.started_at or res.reserved_at,
    }


def _unwritten_params(req: JobRequest, now: datetime, reserved_tokens: int) -> dict[str, Any]:
    """What the closed row of a leased job takes beyond its settlement's parameters (whose
    ``b_region`` is where it ran: the row's own region is ``b_job_region`` here)."""
    params = _job_params(req, now)
    params["b_job_region"] = params.pop("b_region")
    del params["b_version"]  # the settlement's: the version that ran it
    params["b_reserved"] = reserved_tokens
    return params


# --- what the Gateway calls ---------------------------------------------------------------------


def reserve_job(
    db: Database, req: JobRequest, now: datetime, fast: bool = True
) -> Reservation | Existing:
    """The reservation of ``req``: one statement when it can be, the reference path otherwise.

    ``fast=False``: the reference path only (the single statement was tried elsewhere).

    Raises: what ``ledger.reserve`` raises.
    """
    if fast and req.idempotency_key is None:
        with db.single_statement() as conn:
            res = reserve(conn, req, now)
        if res is not None:
            return res
    with db.begin() as conn:
        return ledger.reserve(conn, req, now)


def settle_job(db: Database, res: Reservation, out: Outcome) -> bool:
    """Settle once; False if the job was already closed."""
    if db.dialect == "postgresql":
        with db.single_statement() as conn:
            return settle_pg(conn, res, out)
    with db.begin() as conn:
        return ledger.settle(conn, res, out)
