"""Stop Redis, then PostgreSQL, under load: no accepted job is lost.

Real processes: a private PostgreSQL and a private Redis (never the machine's shared
ones), killed and restarted while clients keep sending requests through the Gateway's
admission and settlement (the same objects the Gateway deployment wires, on the same
event loop). Every admitted job must end in its terminal state, a dead-lettered one
with exactly one DLQ entry, every served job billed exactly once, every slot released.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
import redis
from sqlalchemy import select

from haif.config import HaifConfig
from haif.dlq import DeadLetterQueue
from haif.envelope import RequestContext, build_work_item
from haif.exceptions import StoreUnavailable, WorkerUnavailable
from haif.gateway.admission import Admission
from haif.gateway.auth import DatabaseAuthenticator
from haif.gateway.quota import QuotaGate
from haif.gateway.ratelimit import RedisRateLimiter
from haif.gateway.serving import completion_response
from haif.gateway.settlement import Settlements
from haif.gateway.upkeep import JobUpkeep
from haif.protocol import CompletionRequest
from haif.runtimes.base import GenerationOutput
from haif.store import open_database
from haif.store.aio import AsyncWrites
from haif.store.models import DeadLetter, Job, Quota, UsageRecord
from haif.store.quotas import QuotaLimits
from haif.store.tenants import TenantRepository
from haif.store.tokens import TokenRepository
from tests.support import services
from tests.support.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.chaos

CLIENTS = 12
FAIL_SHARE = 0.3  # of the admitted jobs end with a final (service) error


def _config(pg_url: str, redis_url: str) -> HaifConfig:
    return HaifConfig.model_validate(
        {
            "models": [{"name": "echo", "runtime": "echo"}],
            "server": {"request_timeout_s": 1},
            "database": {"url": pg_url, "pool_size": 4, "connect_timeout_s": 1,
                         "statement_timeout_ms": 2000, "pool_timeout_s": 2},
            "redis": {"url": redis_url, "socket_timeout_s": 0.5, "key_prefix": "chaos"},
            "quotas": {"redis_retry_after_s": 0.3},
            "jobs": {"stale_after_s": 1, "sweep_interval_s": 0.2, "mark_running_after_s": 0.1,
                     "settle_retry_initial_s": 0.05, "settle_retry_max_s": 0.5},
        }
    )  # fmt: skip


def test_stop_redis_then_postgres_under_load_loses_no_accepted_job() -> None:
    with services.own_postgres() as pg, services.own_redis() as rds:
        config = _config(pg.url, rds.url)
        db = open_database(config, migrate=True)
        with db.session() as s:
            tenant = TenantRepository(s).create(
                "acme", QuotaLimits(requests_per_minute=1_000_000, max_concurrent=1000)
            )
            tenant_id = tenant.id
            _, token = TokenRepository(s).create(tenant)
        outcome = asyncio.run(_load(config, db, pg, rds, token))
        _check(config, db, tenant_id, *outcome)
        db.close()


async def _load(config, db, pg, rds, token):  # noqa: ANN001, ANN202
    quotas = QuotaGate(
        db,
        RedisRateLimiter(config.redis),
        AsyncWrites.from_config(config),
        redis_retry_after_s=config.quotas.redis_retry_after_s,
    )
    dlq = DeadLetterQueue(config, db)
    settlements = Settlements(quotas, db, dlq, config.jobs)
    upkeep = JobUpkeep(db, config, settlements.pending)
    auth = DatabaseAuthenticator(db, ttl_s=60, max_entries=10)
    adm = Admission(config, auth, db=db, quotas=quotas, upkeep=upkeep, settlements=settlements)
    stop, chaos_over = asyncio.Event(), asyncio.Event()
    background = [asyncio.create_task(settlements.run(stop)), asyncio.create_task(upkeep.run(stop))]
    expected: dict[str, str] = {}
    seen = Counter()
    most_queued = 0
    rng = random.Random(7)

    async def client() -> None:
        nonlocal most_queued
        while not chaos_over.is_set():
            body = CompletionRequest(model="echo", prompt="hello", max_tokens=4)
            ctx = RequestContext.new(timeout_s=30, api_key=token)
            try:
                ticket = await adm.admit(build_work_item("completion", body, ctx, config.limits))
            except StoreUnavailable:
                seen["503"] += 1  # refused quickly, nothing half-written
                await asyncio.sleep(0.02)
                continue
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # the work
            if rng.random() < FAIL_SHARE:
                expected[ticket.job_id] = "dead_lettered"
                exc = WorkerUnavailable("every worker of 'echo' failed")
                exc.attempts = 3
                await adm.fail(ticket, exc)
            else:
                expected[ticket.job_id] = "succeeded"
                answer = completion_response(
                    "echo", [GenerationOutput("x", 3, 2, "length")], ticket.job_id
                )
                await adm.succeed(ticket, 3, 2, answer)
            most_queued = max(most_queued, len(settlements))

    async def admitted(more: int, what: str) -> None:
        """Wait until ``more`` jobs beyond those admitted so far are admitted (load goes on)."""
        floor = len(expected) + more
        await wait_for_async(lambda: len(expected) >= floor, 120, what=f"{more} jobs admitted {what}")

    async def chaos() -> None:
        await admitted(5, "before the outage")
        rds.kill()
        seen["redis_killed_after"] = len(expected)
        await admitted(5, "with Redis down")
        await asyncio.to_thread(pg.stop)
        seen["pg_stopped_after"] = len(expected)
        await wait_for_async(lambda: seen["503"] > 0, 60, what="a request refused while the stores are down")
        await asyncio.sleep(2.5)  # the outage lasts longer than the sweeper's stale age: it must leave them be
        await asyncio.to_thread(pg.start)
        await admitted(5, "after PostgreSQL came back")
        await asyncio.to_thread(rds.start)
        await admitted(5, "after Redis came back")
        chaos_over.set()

    await asyncio.gather(chaos(), *(client() for _ in range(CLIENTS)))
    await asyncio.gather(*adm._settling)
    await wait_for_async(lambda: len(settlements) == 0, 30, what="the deferred settlements are done")
    stop.set()
    await asyncio.gather(*background)
    await quotas._writes.close()
    return expected, seen, most_queued, settlements.dropped


def _check(config, db, tenant_id, expected, seen, most_queued, dropped) -> None:  # noqa: ANN001
    # The outage really happened, under load, with settlements held across it.
    assert seen["503"] > 0 and most_queued > 0 and dropped == 0, (seen, most_queued)
    assert seen["pg_stopped_after"] > seen["redis_killed_after"] > 0
    with db.connect() as conn:
        states = dict(conn.execute(select(Job.id, Job.state).where(Job.id.in_(expected))).all())
        usage = Counter(
            conn.execute(select(UsageRecord.job_id).where(UsageRecord.tenant_id == tenant_id))
            .scalars()
            .all()
        )
        in_table = Counter(conn.execute(select(DeadLetter.id)).scalars().all())
        attempts = dict(
            conn.execute(
                select(Job.id, Job.attempts).where(Job.state == "dead_lettered")
            ).all()
        )
    assert states == expected  # every admitted job, in the state its outcome says
    served = {j for j, s in expected.items() if s == "succeeded"}
    dead = {j for j, s in expected.items() if s == "dead_lettered"}
    assert set(usage) >= served and all(usage[j] == 1 for j in served)  # billed exactly once
    assert set(usage).isdisjoint(dead)
    assert all(attempts[j] == 3 for j in dead)
    client = redis.Redis.from_url(config.redis.url)
    in_redis = Counter(f[b"id"].decode() for _, f in client.xrange("chaos:dlq"))
    both = in_table + in_redis
    assert {j for j in both if j in expected} == dead
    assert all(both[j] == 1 for j in dead), [j for j in dead if both[j] != 1]  # exactly once
    assert in_table and in_redis  # some entries fell back to the table, the others are in Redis
    assert DeadLetterQueue(config, db).get(next(iter(dead))) is not None

    def slots_free() -> bool:  # orphans of cut admissions are swept; nothing else holds a slot
        with db.connect() as conn:
            return conn.execute(select(Quota.in_flight).where(Quota.tenant_id == tenant_id)).scalar() == 0

    wait_for(slots_free, 30, 0.1, "every concurrency slot released")
