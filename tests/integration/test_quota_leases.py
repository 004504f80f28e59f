"""Quota leases on PostgreSQL: a Gateway replica admits from a block it counted at once.

The books must stay exact: across replicas the limit is never exceeded, nothing is
lost when a lease ends, and a lease is never taken where the per-request path must
decide (near a limit, a concurrency limit, an Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from haif.config import QuotasConfig
from haif.exceptions import StoreUnavailable
from haif.gateway.lease import QuotaLeases
from haif.gateway.quota import QuotaGate
from haif.store import Database, migrate
from haif.store.db import create_db_engine
from haif.store.ledger import Outcome, usage_total
from haif.store.models import Job, JobState, Quota
from haif.store.quotas import QuotaLimits
from haif.store.tenants import TenantRepository
from tests.support import services
from tests.support.store_cases import async_writes, hammer_leases, job, principal_for, tenant
from tests.support.waiting import wait_for_async


@pytest.fixture
def pg_db(pg_server: str) -> Database:
    with services.fresh_database(pg_server, "haif_lease") as url:
        db = Database(create_db_engine(url, pool_size=4))
        migrate.upgrade(db.engine)
        yield db
        db.close()


def _url(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)


def _quota(db: Database, tenant_id: int) -> Quota:
    with db.connect() as conn:
        return conn.execute(select(Quota).where(Quota.tenant_id == tenant_id)).one()


def _done(settle_with: int = 10) -> Outcome:
    now = datetime.now(UTC)
    return Outcome(JobState.SUCCEEDED, settle_with // 2, settle_with - settle_with // 2, now, now, bill=True)


async def _with_gate(db: Database, fn, record_after_s: float = 0.5, **config: float):  # noqa: ANN001, ANN202
    writes = async_writes(db, size=4)
    leases = QuotaLeases(writes, QuotasConfig(**config), record_after_s=record_after_s)
    try:
        return await fn(QuotaGate(db, None, writes, leases=leases), leases)
    finally:
        await leases.close()
        await writes.close()


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [
        (QuotaLimits(requests_per_minute=2000), 2000),
        (QuotaLimits(tokens_per_minute=20_000), 2000),  # 10 tokens reserved and used each
    ],
    ids=["requests_per_minute", "tokens_per_minute"],
)
def test_leases_stay_exact_across_two_replicas(
    pg_db: Database, limits: QuotaLimits, allowed: int
) -> None:
    """3000 concurrent requests from two replicas, room for 2000: exactly 2000 served, most
    on leases, and once the replicas stop the windows hold exactly what was served."""
    t = tenant(pg_db, limits)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        parts = [pool.submit(hammer_leases, _url(pg_db), t, 1500, limits, 10) for _ in range(2)]
        words = [w for p in parts for w in p.result()]
    served = words.count("leased") + words.count("reserved")
    assert served == allowed and words.count("refused") == 3000 - allowed
    assert words.count("leased") > allowed // 2  # the common request took no round trip
    q = _quota(pg_db, t)
    assert (q.minute_requests if limits.requests_per_minute else q.minute_tokens) == (
        allowed if limits.requests_per_minute else allowed * 10
    )
    assert q.in_flight == 0
    with pg_db.connect() as conn:
        assert usage_total(conn, t) == (allowed, allowed * 5, allowed * 5)
        states = conn.execute(select(Job.state).where(Job.tenant_id == t)).scalars().all()
    assert len(states) == allowed and set(states) == {JobState.SUCCEEDED.value}


async def test_a_lease_gives_back_what_it_did_not_hand_out(pg_db: Database) -> None:
    limits = QuotaLimits(requests_per_minute=100_000, tokens_per_minute=1_000_000, tokens_per_day=10_000_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        reservations = [
            await gate.reserve(principal_for(t, limits), job(t, tokens=10, limits=limits), datetime.now(UTC))
            for _ in range(5)
        ]
        assert leases.taken == 1 and all(r.recorded is not None for r in reservations)
        assert all(r.reserved_tokens == 10 for r in reservations)
        q = _quota(pg_db, t)  # the whole block is counted, not five requests
        assert (q.minute_requests, q.minute_tokens, q.day_tokens) == (64, 640, 640)
        for r in reservations:
            assert await gate.settle(r, _done(4))  # each used 4 of its 10: 6 refunded
        leases.tick(datetime.now(UTC) + timedelta(seconds=5))  # idle: the lease ends
        assert len(leases) == 0
        await leases.close()  # waits for the give-back
        assert leases.returned == 1

    await _with_gate(pg_db, run, lease_max_requests=64)
    q = _quota(pg_db, t)
    assert (q.minute_requests, q.minute_tokens, q.day_tokens) == (5, 20, 20)
    with pg_db.connect() as conn:
        assert usage_total(conn, t) == (5, 10, 10)


def _count_statements(leases: QuotaLeases) -> list[str]:
    """The SQL of every statement sent through the leases' writes from now on."""
    sent: list[str] = []
    writes = leases._writes
    run = writes._run

    async def counted(compiled, values):  # noqa: ANN001, ANN202
        sent.append(compiled.sql)
        return await run(compiled, values)

    writes._run = counted
    return sent


def _job(db: Database, job_id: str) -> Job | None:
    with db.session() as s:
        job_row = s.get(Job, job_id)
        if job_row is not None:
            s.expunge(job_row)
        return job_row


def _settled_once(db: Database, tenant_id: int, job_id: str) -> None:
    """The tenant's one job closed succeeded, billed once (``_done()``: 5 + 5 tokens)."""
    assert _job(db, job_id).state == JobState.SUCCEEDED.value
    with db.connect() as conn:
        assert usage_total(conn, tenant_id) == (1, 5, 5)


async def test_a_short_leased_job_costs_one_statement(pg_db: Database) -> None:
    """Admitted on a lease and settled before its row's delay: one statement in all, which
    writes the job row closed, refunds and bills; a retried settlement changes nothing."""
    limits = QuotaLimits(requests_per_minute=100_000, tokens_per_minute=1_000_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> str:
        principal = principal_for(t, limits)
        first = await gate.reserve(principal, job(t, tokens=10, limits=limits), datetime.now(UTC))
        sent = _count_statements(leases)  # the lease is taken: what one more request costs
        res = await gate.reserve(principal, job(t, tokens=10, limits=limits), datetime.now(UTC))
        assert res.recorded is not None and sent == []
        assert _job(pg_db, res.job_id) is None  # no row yet: it comes with the settlement
        assert await gate.settle(res, _done(4))
        assert len(sent) == 1
        assert not await gate.settle(res, _done(4))  # a retry: already closed, nothing added
        assert await gate.settle(first, _done(4))
        return res.job_id

    job_id = await _with_gate(pg_db, run, record_after_s=30)
    row = _job(pg_db, job_id)
    assert row is not None and row.state == JobState.SUCCEEDED.value
    assert (row.tenant_id, row.kind, row.model, row.version) == (t, "completion", "echo", "1")
    assert (row.reserved_tokens, row.prompt_tokens, row.completion_tokens) == (10, 2, 2)
    assert row.created_at is not None and row.finished_at is not None and not row.holds_slot
    q = _quota(pg_db, t)
    assert (q.minute_requests, q.minute_tokens) == (2, 8)  # the block given back; 4 + 4 used
    with pg_db.connect() as conn:
        assert usage_total(conn, t) == (2, 4, 4)


async def test_a_leased_job_that_runs_long_has_its_row_written_open(pg_db: Database) -> None:
    """Past its row's delay the job is there, reserved (it can be looked up, marked
    running, swept); settlement then closes that row."""
    limits = QuotaLimits(requests_per_minute=100_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> str:
        res = await gate.reserve(principal_for(t, limits), job(t, limits=limits), datetime.now(UTC))
        assert res.recorded is not None
        row = await wait_for_async(lambda: _job(pg_db, res.job_id), 30, what="the job's row, past its delay")
        assert row.state == JobState.RESERVED.value
        assert await gate.settle(res, _done())
        assert not await gate.settle(res, _done())
        return res.job_id

    _settled_once(pg_db, t, await _with_gate(pg_db, run, record_after_s=0.05))


async def test_a_leased_stream_has_its_row_written_at_once(pg_db: Database) -> None:
    """A stream's client reads the job id in its first chunk: the row is there from the start."""
    limits = QuotaLimits(requests_per_minute=100_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        principal = principal_for(t, limits)
        res = await gate.reserve(principal, job(t, limits=limits), datetime.now(UTC), streamed=True)
        assert res.recorded is not None
        await asyncio.sleep(0.01)  # the write runs beside the dispatch, not after a delay
        await res.recorded.task
        assert _job(pg_db, res.job_id).state == JobState.RESERVED.value
        assert not res.recorded.claim()  # written open: settlement updates it
        assert await gate.settle(res, _done())

    await _with_gate(pg_db, run, record_after_s=30)


async def test_settlement_writes_the_job_row_when_its_own_write_failed(pg_db: Database) -> None:
    """The row's delayed write fails (the store is down): settlement writes it, then closes it."""
    limits = QuotaLimits(requests_per_minute=100_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> str:
        writes = leases._writes
        record_job = writes.record_job
        failures = []

        async def down_once(*args):  # noqa: ANN002, ANN202
            if not failures:
                failures.append(args)
                raise StoreUnavailable("the metadata store is unavailable; retry later")
            return await record_job(*args)

        writes.record_job = down_once
        res = await gate.reserve(principal_for(t, limits), job(t, limits=limits), datetime.now(UTC))
        await wait_for_async(lambda: failures, 30, what="the row's write, past its delay")
        await asyncio.sleep(0.3)  # a negative check: no retry writes the row meanwhile
        assert len(failures) == 1 and _job(pg_db, res.job_id) is None
        assert await gate.settle(res, _done())
        return res.job_id

    _settled_once(pg_db, t, await _with_gate(pg_db, run, record_after_s=0.05))


async def test_no_lease_near_a_limit_or_where_the_request_path_decides(pg_db: Database) -> None:
    small = QuotaLimits(requests_per_minute=50)  # 2 % of 50 is 1 request: not worth a lease
    slots = QuotaLimits(requests_per_minute=100_000, max_concurrent=4)
    t_small, t_slots, t_stale = tenant(pg_db, small), tenant(pg_db, slots), tenant(pg_db, slots)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        now = datetime.now(UTC)
        for t, limits, key in (
            (t_small, small, None),
            (t_slots, slots, None),
            (t_small, small, "key-1"),
            # The cache says no concurrency limit; the database has one: it decides.
            (t_stale, QuotaLimits(requests_per_minute=100_000), None),
        ):
            res = await gate.reserve(principal_for(t, limits), job(t, limits=limits, key=key), now)
            assert res.recorded is None, (t, limits, key)  # the per-request path's reservation
        assert leases.taken == 0 and len(leases) == 0
        assert _quota(pg_db, t_stale).in_flight == 1  # the slot was taken, and is the only one

    await _with_gate(pg_db, run)


async def test_a_lease_never_takes_the_last_half_of_a_window(pg_db: Database) -> None:
    limits = QuotaLimits(requests_per_minute=1000)  # leases of 2 % = 20 requests
    t = tenant(pg_db, limits)
    with pg_db.session() as s:
        s.get(Quota, t).minute_requests = 975  # 25 left: a block of 20 needs 40
        s.get(Quota, t).minute_started_at = datetime.now(UTC)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        now = datetime.now(UTC)
        res = await gate.reserve(principal_for(t, limits), job(t, limits=limits), now)
        assert res.recorded is None and leases.taken == 0
        # Until lease_idle_s has passed, the tenant's requests do not try again: one
        # statement each (a lease attempt would have to fail first).
        statements = []
        take = leases._writes.take_lease

        async def counted(*args):  # noqa: ANN002, ANN202
            statements.append(args)
            return await take(*args)

        leases._writes.take_lease = counted
        res = await gate.reserve(principal_for(t, limits), job(t, limits=limits), now)
        assert res.recorded is None and statements == []
        leases.tick(now + timedelta(seconds=1))
        await gate.reserve(principal_for(t, limits), job(t, limits=limits), now + timedelta(seconds=1))
        assert len(statements) == 1 and leases.taken == 0  # tried again, still no room

    await _with_gate(pg_db, run)
    assert _quota(pg_db, t).minute_requests == 978


async def test_a_lease_ends_before_its_minute_does(pg_db: Database) -> None:
    limits = QuotaLimits(requests_per_minute=100_000)
    t = tenant(pg_db, limits)
    with pg_db.session() as s:  # the window started 59.5 s ago
        s.get(Quota, t).minute_started_at = datetime.now(UTC) - timedelta(seconds=59.5)
        s.get(Quota, t).minute_requests = 1

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        res = await gate.reserve(principal_for(t, limits), job(t, limits=limits), datetime.now(UTC))
        assert res.recorded is None  # the lease would end at once: the request is counted alone
        assert leases.taken == 1 and len(leases) == 0
        await leases.close()

    await _with_gate(pg_db, run, lease_max_requests=64)
    assert _quota(pg_db, t).minute_requests == 2  # the block came back; the request stays


async def test_tenants_without_limits_are_admitted_with_only_their_job_row(pg_db: Database) -> None:
    with pg_db.session() as s:
        t = TenantRepository(s).create("free", QuotaLimits()).id

    async def run(gate: QuotaGate, leases: QuotaLeases) -> str:
        res = await gate.reserve(principal_for(t, QuotaLimits()), job(t), datetime.now(UTC))
        assert res.recorded is not None and res.reserved_tokens == 0 and leases.taken == 0
        await res.recorded.ensure()
        with pg_db.connect() as conn:
            assert conn.execute(select(Job.state).where(Job.id == res.job_id)).scalar() == "reserved"
        assert await gate.settle(res, _done())
        return res.job_id

    await _with_gate(pg_db, run)
    with pg_db.connect() as conn:
        assert usage_total(conn, t) == (1, 5, 5)


async def test_a_lease_gives_back_to_a_window_a_later_clock_opened(pg_db: Database) -> None:
    """Another replica opened the window with a clock a little ahead of this request's:
    the lease and the refund still go back to that window (it is the one they were counted in)."""
    limits = QuotaLimits(tokens_per_minute=1_000_000, tokens_per_day=10_000_000)
    t = tenant(pg_db, limits)
    now = datetime.now(UTC)
    with pg_db.session() as s:
        quota = s.get(Quota, t)
        quota.minute_started_at = quota.day_started_at = now + timedelta(milliseconds=5)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        res = await gate.reserve(principal_for(t, limits), job(t, tokens=10, limits=limits), now)
        assert res.recorded is not None and leases.taken == 1
        assert await gate.settle(res, _done(4))  # 6 of its 10 refunded
        await leases.close()  # the other 630 of the block of 640 given back
        assert leases.returned == 1

    await _with_gate(pg_db, run, lease_max_requests=64)
    q = _quota(pg_db, t)
    assert (q.minute_tokens, q.day_tokens) == (4, 4)


async def test_a_take_in_flight_is_shared_and_outlives_its_request(pg_db: Database) -> None:
    """Requests that find a take in flight wait for it and use its lease; the request that
    started it is cancelled meanwhile (its client went away), and the block the database
    counted is not lost: it is handed out, and what is left goes back."""
    limits = QuotaLimits(tokens_per_minute=1_000_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        take = leases._writes.take_lease

        async def slow_take(*args):  # noqa: ANN002, ANN202 - counted, then a slow reply
            counted = await take(*args)
            await asyncio.sleep(0.05)
            return counted

        leases._writes.take_lease = slow_take
        p = principal_for(t, limits)
        first = asyncio.ensure_future(gate.reserve(p, job(t, tokens=10, limits=limits), datetime.now(UTC)))
        await asyncio.sleep(0.01)  # its take is in flight
        others = [
            asyncio.ensure_future(gate.reserve(p, job(t, tokens=10, limits=limits), datetime.now(UTC)))
            for _ in range(5)
        ]
        first.cancel()
        got = await asyncio.gather(*others)
        assert leases.taken == 1 and all(r.recorded is not None for r in got)
        for r in got:
            assert await gate.settle(r, _done(10))
        await leases.close()

    await _with_gate(pg_db, run, lease_max_requests=64)
    assert _quota(pg_db, t).minute_tokens == 50  # five requests of 10; the rest came back


async def test_a_lease_never_hands_out_more_than_it_counted(pg_db: Database) -> None:
    """Leases of 2 requests, 60 concurrent requests: each lease is used up by whoever gets
    there first, and the request whose take it was checks again (at least 30 takes)."""
    limits = QuotaLimits(tokens_per_minute=1_000_000)
    t = tenant(pg_db, limits)

    async def run(gate: QuotaGate, leases: QuotaLeases) -> None:
        p = principal_for(t, limits)
        got = await asyncio.gather(
            *(gate.reserve(p, job(t, tokens=10, limits=limits), datetime.now(UTC)) for _ in range(60))
        )
        assert all(r.recorded is not None for r in got)
        assert leases.taken >= 30
        assert all(lease.tokens >= 0 for lease in leases._leases.values())
        await leases.close()

    await _with_gate(pg_db, run, lease_max_requests=2)
    assert _quota(pg_db, t).minute_tokens == 600
