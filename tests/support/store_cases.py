"""Metadata-store behaviours every dialect must have; run on SQLite (unit) and PostgreSQL (integration).

Each ``case_*`` takes a migrated, empty-of-tenants ``Database``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from haif.exceptions import Conflict, InvalidRequest, NotFound, QuotaExceeded, RateLimited
from haif.store import fastpath, ledger, usage
from haif.store.aio import AsyncWrites
from haif.store.db import Database
from haif.store.ledger import Existing, JobRequest, Outcome, Reservation
from haif.store.models import ApiToken, Job, JobState, P2PPeer, Quota, Tenant
from haif.store.peers import PeerInfo, PeerRepository, find_peer
from haif.store.quotas import QuotaLimits
from haif.store.tenants import TenantRepository
from haif.store.tokens import TokenRepository, find_token, hash_token, lookup_prefix

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def tenant(db: Database, limits: QuotaLimits | None = None) -> int:
    with db.session() as s:
        return TenantRepository(s).create(f"t-{uuid.uuid4().hex[:8]}", limits).id


def job(
    tenant_id: int,
    *,
    tokens: int = 10,
    limits: QuotaLimits | None = None,
    key: str | None = None,
    digest: str | None = None,
    count_requests: bool = True,
) -> JobRequest:
    return JobRequest(
        job_id=f"cmpl-{uuid.uuid4().hex}",
        tenant_id=tenant_id,
        token_id=None,
        kind="completion",
        model="echo",
        version="1",
        tokens=tokens,
        limits=limits or QuotaLimits(),
        count_requests=count_requests,
        idempotency_key=key,
        request_hash=digest,
    )


@dataclass(frozen=True)
class Writes:
    """How a case reserves and settles: as the Gateway does on SQLite (``fast``) and on
    PostgreSQL (``aio``, from an event loop), or the reference transaction."""

    mode: str  # fast | aio | reference

    def reserve(self, db: Database, req: JobRequest, now: datetime = T0) -> Reservation | Existing:
        if self.mode == "aio":
            reserved = asyncio.run(_aio(db, lambda w: w.reserve(req, now)))
            return reserved or fastpath.reserve_job(db, req, now, fast=False)
        return fastpath.reserve_job(db, req, now, fast=self.mode == "fast")

    def close(self, db: Database, res: Reservation, out: Outcome) -> bool:
        if self.mode == "aio":
            return asyncio.run(_aio(db, lambda w: w.settle(res, out)))
        if self.mode == "fast":
            return fastpath.settle_job(db, res, out)
        with db.begin() as conn:
            return ledger.settle(conn, res, out)

    def settle(
        self,
        db: Database,
        res: Reservation,
        prompt: int,
        completion: int,
        now: datetime = T0,
        response: str | None = None,
    ) -> bool:
        out = Outcome(
            JobState.SUCCEEDED,
            prompt_tokens=prompt,
            completion_tokens=completion,
            started_at=now,
            finished_at=now,
            response=response,
            bill=True,
        )
        return self.close(db, res, out)


def async_writes(db: Database, size: int = 1) -> AsyncWrites:
    url = db.engine.url.render_as_string(hide_password=False)
    return AsyncWrites(url, size=size, connect_timeout_s=5, statement_timeout_ms=10_000)


async def _aio(db: Database, call: Any) -> Any:
    writes = async_writes(db)
    try:
        return await call(writes)
    finally:
        await writes.close()


GATEWAY = Writes("fast")
WRITES = [GATEWAY, Writes("reference")]
PG_WRITES = [*WRITES, Writes("aio")]
reserve = GATEWAY.reserve
settle = GATEWAY.settle


def quota(db: Database, tenant_id: int) -> Quota:
    with db.session() as s:
        return s.get(Quota, tenant_id)


def case_requests_per_minute_exact(db: Database, w: Writes) -> None:
    limits = QuotaLimits(requests_per_minute=3)
    t = tenant(db, limits)
    for i in range(3):
        assert isinstance(
            w.reserve(db, job(t, limits=limits), T0 + timedelta(seconds=i)), Reservation
        )
    with pytest.raises(RateLimited) as info:
        w.reserve(db, job(t, limits=limits), T0 + timedelta(seconds=10))
    assert info.value.retry_after_s == 50
    # Refused requests leave no job behind; the window reopens after 60 s.
    with db.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(Job).where(Job.tenant_id == t)).scalar()
            == 3
        )
    assert isinstance(w.reserve(db, job(t, limits=limits), T0 + timedelta(seconds=60)), Reservation)


def case_tokens_reserved_then_refunded(db: Database, w: Writes) -> None:
    limits = QuotaLimits(tokens_per_minute=100, tokens_per_day=1000)
    t = tenant(db, limits)
    a = w.reserve(db, job(t, tokens=60, limits=limits))
    with pytest.raises(RateLimited):
        w.reserve(db, job(t, tokens=50, limits=limits))  # 60 + 50 > 100
    assert w.settle(db, a, prompt=5, completion=15)  # used 20: 40 refunded
    q = quota(db, t)
    assert (q.minute_tokens, q.day_tokens) == (20, 20)
    assert isinstance(w.reserve(db, job(t, tokens=80, limits=limits)), Reservation)
    with db.connect() as conn:
        assert ledger.usage_total(conn, t) == (1, 5, 15)


def case_overdraft_is_charged(db: Database, w: Writes) -> None:
    limits = QuotaLimits(tokens_per_day=1000)
    t = tenant(db, limits)
    a = w.reserve(db, job(t, tokens=10, limits=limits))
    w.settle(db, a, prompt=30, completion=5)  # the prompt estimate was low
    assert quota(db, t).day_tokens == 35


def case_refund_never_reaches_a_later_window(db: Database, w: Writes) -> None:
    limits = QuotaLimits(tokens_per_minute=100)
    t = tenant(db, limits)
    a = w.reserve(db, job(t, tokens=90, limits=limits), T0)
    b = w.reserve(db, job(t, tokens=30, limits=limits), T0 + timedelta(seconds=61))  # a new window
    w.settle(db, a, prompt=1, completion=1, now=T0 + timedelta(seconds=62))
    assert quota(db, t).minute_tokens == 30  # a's refund belonged to the closed window
    assert isinstance(b, Reservation)


def case_day_quota_is_429_insufficient_quota(db: Database, w: Writes) -> None:
    limits = QuotaLimits(tokens_per_day=100)
    t = tenant(db, limits)
    w.settle(db, w.reserve(db, job(t, tokens=100, limits=limits)), 50, 50)
    with pytest.raises(QuotaExceeded):
        w.reserve(db, job(t, tokens=1, limits=limits), T0 + timedelta(hours=1))


def case_concurrency_slots_are_released_once(db: Database, w: Writes) -> None:
    limits = QuotaLimits(max_concurrent=1)
    t = tenant(db, limits)
    a = w.reserve(db, job(t, limits=limits))
    with pytest.raises(RateLimited, match="concurrent"):
        w.reserve(db, job(t, limits=limits))
    assert w.settle(db, a, 1, 1)
    assert not w.settle(db, a, 1, 1)  # a job is settled once
    assert quota(db, t).in_flight == 0
    assert isinstance(w.reserve(db, job(t, limits=limits)), Reservation)
    with db.connect() as conn:
        assert ledger.usage_total(conn, t) == (1, 1, 1)


def case_unlimited_tenant_takes_no_quota(db: Database, w: Writes) -> None:
    t = tenant(db)
    res = w.reserve(db, job(t, tokens=10**9))
    assert isinstance(res, Reservation) and not res.holds_quota
    w.settle(db, res, 3, 4)
    q = quota(db, t)
    assert (q.minute_requests, q.day_tokens, q.in_flight) == (0, 0, 0)


def case_limits_from_the_row_win_over_the_cache(db: Database, w: Writes) -> None:
    t = tenant(db, QuotaLimits(requests_per_minute=1))
    stale_cache = QuotaLimits(requests_per_minute=100)
    w.reserve(db, job(t, limits=stale_cache))
    with pytest.raises(RateLimited):
        w.reserve(db, job(t, limits=stale_cache))


def case_idempotency_key(db: Database, w: Writes) -> None:
    t = tenant(db)
    first = w.reserve(db, job(t, key="k1", digest="h1"))
    assert isinstance(first, Reservation)
    dup = w.reserve(db, job(t, key="k1", digest="h1"))
    assert isinstance(dup, Existing) and dup.job_id == first.job_id and dup.state == "reserved"
    with pytest.raises(Conflict):
        w.reserve(db, job(t, key="k1", digest="other"))
    w.settle(db, first, 1, 2, response='{"x": 1}')
    replay = w.reserve(db, job(t, key="k1", digest="h1"))
    assert (
        isinstance(replay, Existing)
        and replay.state == "succeeded"
        and replay.response == '{"x": 1}'
    )
    # Another tenant's identical key is another job.
    other = w.reserve(db, job(tenant(db), key="k1", digest="h1"))
    assert isinstance(other, Reservation) and other.job_id != first.job_id
    with db.connect() as conn:
        assert ledger.usage_total(conn, t) == (1, 1, 2)


def case_failed_idempotent_job_is_taken_over(db: Database, w: Writes) -> None:
    limits = QuotaLimits(max_concurrent=5)
    t = tenant(db, limits)
    first = w.reserve(db, job(t, key="k", digest="h", limits=limits))
    w.close(db, first, Outcome(JobState.FAILED, error="boom", finished_at=T0))
    again = w.reserve(db, job(t, key="k", digest="h", limits=limits))
    assert isinstance(again, Reservation) and again.job_id == first.job_id
    assert isinstance(w.reserve(db, job(t, key="k", digest="h", limits=limits)), Existing)
    assert quota(db, t).in_flight == 1


def case_idempotency_refused_by_quota_leaves_no_claim(db: Database, w: Writes) -> None:
    limits = QuotaLimits(tokens_per_minute=10)
    t = tenant(db, limits)
    w.settle(db, w.reserve(db, job(t, tokens=10, limits=limits)), 5, 5)
    with pytest.raises(RateLimited):
        w.reserve(db, job(t, tokens=5, limits=limits, key="k", digest="h"))
    res = w.reserve(
        db, job(t, tokens=5, limits=limits, key="k", digest="h"), T0 + timedelta(seconds=61)
    )
    assert isinstance(res, Reservation)  # the key was not burned by the refusal


def case_sweeper_releases_abandoned_jobs(db: Database, w: Writes) -> None:
    limits = QuotaLimits(max_concurrent=1, tokens_per_day=100)
    t = tenant(db, limits)
    res = w.reserve(db, job(t, tokens=40, limits=limits))
    with db.begin() as conn:
        assert ledger.mark_running(conn, [res.job_id], T0) == 1
        stale = ledger.stale_jobs(conn, T0 + timedelta(seconds=1))
    assert [s.job_id for s in stale] == [res.job_id]
    assert w.close(db, stale[0], Outcome(JobState.FAILED, finished_at=T0))
    q = quota(db, t)
    assert (q.in_flight, q.day_tokens) == (0, 0)
    assert not w.settle(db, res, 1, 1)  # the Gateway that comes back late cannot settle it again


def case_forget_idempotency_keys(db: Database, w: Writes) -> None:
    t = tenant(db)
    first = w.reserve(db, job(t, key="k", digest="h"), T0)
    w.settle(db, first, 1, 1, response="{}")
    with db.begin() as conn:
        assert ledger.forget_idempotency_keys(conn, T0 + timedelta(days=2)) == 1
    assert isinstance(w.reserve(db, job(t, key="k", digest="h")), Reservation)


def case_tenants_and_tokens(db: Database, w: Writes) -> None:
    with db.session() as s:
        tenants = TenantRepository(s)
        acme = tenants.create("acme", QuotaLimits(requests_per_minute=5))
        with pytest.raises(Conflict):
            tenants.create("acme")
        with pytest.raises(InvalidRequest):
            tenants.create("'; DROP TABLE tenants; --")
        with pytest.raises(NotFound):
            tenants.get("nobody")
        row, token = TokenRepository(s).create(
            acme, scopes=("inference", "admin"), allowed_models=["echo"]
        )
        token_id, prefix = row.id, row.prefix
    assert token.startswith(f"haif_{prefix}_") and lookup_prefix(token) == prefix
    with db.session() as s:
        stored = s.get(ApiToken, token_id)
        assert stored.secret_hash == hash_token(token) and token not in (
            stored.secret_hash,
            stored.prefix,
        )
    with db.connect() as conn:
        info = find_token(conn, prefix)
    assert info.tenant == "acme" and info.scopes == {"inference", "admin"}
    assert info.allowed_models == {"echo"} and info.limits == (5, None, None, None)
    with db.session() as s:
        assert TokenRepository(s).revoke(token).id == token_id  # by the token itself
    with db.session() as s:
        assert (
            TokenRepository(s).revoke(str(token_id)).revoked_at is not None
        )  # by id, again: no-op
        with pytest.raises(NotFound):
            TokenRepository(s).revoke("haif_aaaaaaaaaaaa_" + "x" * 43)
        q = TenantRepository(s).set_limits(
            "acme", {"requests_per_minute": None, "max_concurrent": 3}
        )
        assert (q.requests_per_minute, q.max_concurrent) == (None, 3)


def case_p2p_peers(db: Database, w: Writes) -> None:
    key, other = "ab" * 32, "CD" * 32
    with db.session() as s:
        tenants = TenantRepository(s)
        acme = tenants.create("acme", QuotaLimits(requests_per_minute=7))
        beta = tenants.create("beta")
        peers = PeerRepository(s)
        peers.add(key, acme)
        peers.add(other, beta)  # stored lower-case
        with pytest.raises(Conflict, match="acme"):
            peers.add(key.upper(), beta)
        with pytest.raises(InvalidRequest):
            peers.add("ab" * 31, acme)
        assert [(p.public_key, n) for p, n in peers.list()] == [(key, "acme"), (other.lower(), "beta")]
        assert [p.public_key for p, _ in peers.list(beta)] == [other.lower()]
    with db.connect() as conn:
        info = find_peer(conn, key.upper())
        assert info == PeerInfo(public_key=key, tenant_id=acme.id, tenant="acme", limits=(7, None, None, None))
        assert find_peer(conn, "ef" * 32) is None
    with db.session() as s:
        assert PeerRepository(s).remove(other).public_key == other.lower()
        with pytest.raises(NotFound):
            PeerRepository(s).remove(other)
    with db.session() as s:  # a tenant's peers go with it
        s.delete(s.get(Tenant, acme.id))
    with db.session() as s:
        assert s.get(P2PPeer, key) is None


def case_usage_export_and_batches(db: Database, w: Writes) -> None:
    t = tenant(db)
    jobs = [w.reserve(db, job(t)) for _ in range(5)]
    for i, res in enumerate(jobs):
        w.settle(db, res, i, 2 * i)
    with db.connect() as conn:
        rows = list(usage.export_rows(conn, page=2))
    assert [r["job_id"] for r in rows] == [r.job_id for r in jobs]
    assert rows[3]["prompt_tokens"] == 3 and rows[3]["completion_tokens"] == 6
    assert rows[0]["started_at"].endswith("Z")
    with db.connect() as conn:
        assert list(usage.export_rows(conn, since=T0 + timedelta(seconds=1))) == []
    now = datetime.now(UTC)
    with db.begin() as conn:
        batch_id, records = usage.claim_batch(conn, now, lease_s=30, size=3)
    assert len(records) == 3
    with db.begin() as conn:  # the first batch is leased: the next claim builds a new one
        second, rest = usage.claim_batch(conn, now, lease_s=30, size=3)
    assert second != batch_id and len(rest) == 2
    with db.begin() as conn:
        assert usage.claim_batch(conn, now, lease_s=30, size=3) is None
        usage.record_attempt(conn, second, delivered=True, error=None, now=now, lease_s=30)
    with (
        db.begin() as conn
    ):  # the lease of the first lapsed: it is sent again, same id, same records
        again, same = usage.claim_batch(conn, now + timedelta(seconds=31), lease_s=30, size=3)
    assert again == batch_id and same == records
    with db.connect() as conn:
        assert usage.pending_records(conn) == 3


def case_the_end_user_is_recorded_on_the_job(db: Database, w: Writes) -> None:
    """The request's `user` lands on its job row whichever path wrote it: no quota at all,
    a quota row (the single statement), an Idempotency-Key (the reference transaction)."""
    limited = QuotaLimits(requests_per_minute=100)
    for limits, key in ((None, None), (limited, None), (limited, f"k-{uuid.uuid4().hex}")):
        t = tenant(db, limits)
        req = dataclasses.replace(job(t, limits=limits, key=key, digest="h" if key else None), user="end-user-7")
        res = w.reserve(db, req)
        assert isinstance(res, Reservation)
        with db.session() as s:
            assert s.get(Job, req.job_id).end_user == "end-user-7"
        with db.begin() as conn:
            assert usage.tenant_job(conn, t, req.job_id)["user"] == "end-user-7"


CASES = [value for name, value in sorted(globals().items()) if name.startswith("case_")]


# --- several processes against one database (PostgreSQL) ---------------------------------------


def hammer(
    url: str,
    tenant_id: int,
    requests: int,
    limits: QuotaLimits,
    key: str | None = None,
    threads: int = 16,
    settle_with: int | None = None,
) -> list[str]:
    """One "Gateway replica": ``requests`` concurrent reservations (and settlements) from its own engine.

    Returns one word per request: ``reserved``, ``existing`` or ``refused``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from haif.store.db import create_db_engine

    db = Database(create_db_engine(url, pool_size=threads, max_overflow=0))

    def one(_: int) -> str:
        req = job(tenant_id, tokens=10, limits=limits, key=key, digest="h" if key else None)
        try:
            res = reserve(db, req, datetime.now(UTC))
        except RateLimited:
            return "refused"
        if isinstance(res, Existing):
            return "existing"
        if settle_with is not None:
            settle(db, res, settle_with // 2, settle_with - settle_with // 2, datetime.now(UTC))
        return "reserved"

    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, range(requests)))
    finally:
        db.close()


def hammer_async(
    url: str, tenant_id: int, requests: int, limits: QuotaLimits, settle_with: int
) -> list[str]:
    """One "Gateway replica" as on PostgreSQL: ``requests`` concurrent coroutines on one event loop."""
    from haif.store.db import create_db_engine

    db = Database(create_db_engine(url, pool_size=2, max_overflow=0))

    async def run() -> list[str]:
        writes = async_writes(db, size=8)

        async def one() -> str:
            req = job(tenant_id, tokens=10, limits=limits)
            res = await writes.reserve(req, datetime.now(UTC))
            if res is None:  # refused here: the reference path says why (or admits it)
                try:
                    res = await asyncio.to_thread(
                        fastpath.reserve_job, db, req, datetime.now(UTC), False
                    )
                except RateLimited:
                    return "refused"
            half = settle_with // 2
            out = Outcome(
                JobState.SUCCEEDED,
                half,
                settle_with - half,
                datetime.now(UTC),
                datetime.now(UTC),
                bill=True,
            )
            await writes.settle(res, out)
            return "reserved"

        try:
            return list(await asyncio.gather(*(one() for _ in range(requests))))
        finally:
            await writes.close()

    try:
        return asyncio.run(run())
    finally:
        db.close()


def hammer_leases(
    url: str, tenant_id: int, requests: int, limits: QuotaLimits, settle_with: int
) -> list[str]:
    """One Gateway replica's QuotaGate with quota leases: ``requests`` concurrent requests.

    Every request is settled (using ``settle_with`` of its 10 reserved tokens); at the end
    the replica stops and its leases give back what they did not hand out.
    """
    from haif.config import QuotasConfig
    from haif.gateway.lease import QuotaLeases
    from haif.gateway.quota import QuotaGate
    from haif.store.db import create_db_engine

    db = Database(create_db_engine(url, pool_size=2, max_overflow=0))

    async def run() -> list[str]:
        writes = async_writes(db, size=8)
        leases = QuotaLeases(writes, QuotasConfig(lease_fraction=0.02, lease_max_requests=64))
        gate = QuotaGate(db, None, writes, leases=leases)

        async def one() -> str:
            req = job(tenant_id, tokens=10, limits=limits)
            try:
                res = await gate.reserve(principal_for(tenant_id, limits), req, datetime.now(UTC))
            except (RateLimited, QuotaExceeded):
                return "refused"
            half = settle_with // 2
            out = Outcome(
                JobState.SUCCEEDED, half, settle_with - half, datetime.now(UTC), datetime.now(UTC),
                bill=True,
            )
            assert await gate.settle(res, out)
            return "leased" if res.recorded is not None else "reserved"

        try:
            return list(await asyncio.gather(*(one() for _ in range(requests))))
        finally:
            await leases.close()
            await writes.close()

    try:
        return asyncio.run(run())
    finally:
        db.close()


def principal_for(tenant_id: int, limits: QuotaLimits) -> Any:
    from haif.envelope import Principal

    return Principal(tenant=f"t{tenant_id}", tenant_id=tenant_id, limits=limits)
