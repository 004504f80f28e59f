"""The dead-letter queue with Redis (a server of its own, killed and restarted): entries go
to Redis and fall back to the table when it dies; rate limits count in the store meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from haif.config import HaifConfig
from haif.dlq import DeadLetterQueue
from haif.exceptions import RateLimited, StoreUnavailable
from haif.gateway.admission import Admission
from haif.gateway.auth import DatabaseAuthenticator
from haif.gateway.quota import QuotaGate
from haif.gateway.ratelimit import RedisRateLimiter
from haif.store import open_database
from haif.store.quotas import QuotaLimits
from tests.support import services
from tests.support.admission import answer, make_tenant
from tests.support.dlq import MODELS, admission, final_error, job, request
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.integration


# --- Redis, and Redis dying ---------------------------------------------------------------------


@pytest.fixture
def private_redis():  # noqa: ANN201
    with services.own_redis() as server:
        yield server


def redis_config(tmp_path: Path, url: str, **dlq: object) -> HaifConfig:
    return sqlite_config(
        tmp_path,
        redis={"url": url, "socket_timeout_s": 0.5, "key_prefix": "t"},
        dlq={"max_entries": 3, **dlq},
        quotas={"redis_retry_after_s": 0},
        **MODELS,
    )


async def test_entries_go_to_redis_and_fall_back_to_the_table_when_it_dies(
    tmp_path: Path, private_redis: services.OwnRedis
) -> None:
    config = redis_config(tmp_path, private_redis.url)
    db = open_database(config, migrate=True)
    _, token = make_tenant(db, "acme")
    adm = admission(config, db)
    client = redis.Redis.from_url(private_redis.url)

    async def fail_one() -> str:
        ticket = await adm.admit(request(config, token))
        await adm.fail(ticket, final_error(4))
        return ticket.job_id

    in_redis = [await fail_one() for _ in range(5)]
    assert client.xlen("t:dlq") == 3 and client.hlen("t:dlq:ids") == 3  # MAXLEN, index kept in step
    fields = client.xrevrange("t:dlq", count=1)[0][1]
    assert fields[b"id"].decode() == in_redis[-1] and fields[b"attempts"] == b"4"
    assert fields[b"trace_id"] == b"0af7651916cd43dd8448eb211c80319c"

    private_redis.kill()
    in_table = await fail_one()  # Redis is gone: the entry lands in the table
    assert job(db, in_table).state == "dead_lettered"
    dlq = DeadLetterQueue(config, db)
    assert [e.id for e in dlq.newest(10)] == [in_table]
    assert dlq.redis_error is not None

    private_redis.start()  # append-only: what Redis held survived the kill
    dlq = DeadLetterQueue(config, db)
    assert [e.id for e in dlq.newest(10)] == [in_table, *reversed(in_redis[-3:])]
    assert dlq.get(in_redis[-1]).attempts == 4 and dlq.get(in_table) is not None
    assert dlq.remove(in_redis[-1]) and dlq.remove(in_table)
    assert not dlq.remove(in_table)
    assert dlq.remove_all() == 2 and dlq.newest(10) == []
    db.close()


async def test_rate_limits_count_in_the_store_while_redis_is_down(
    tmp_path: Path, private_redis: services.OwnRedis
) -> None:
    config = redis_config(tmp_path, private_redis.url)
    db = open_database(config, migrate=True)
    _, token = make_tenant(db, "acme", QuotaLimits(requests_per_minute=3))
    auth = DatabaseAuthenticator(db, ttl_s=5, max_entries=100)
    limiter = RedisRateLimiter(config.redis)
    adm = Admission(config, auth, db=db, quotas=QuotaGate(db, limiter, redis_retry_after_s=60))

    async def outcomes(n: int) -> list[str]:
        out = []
        for _ in range(n):
            try:
                ticket = await adm.admit(request(config, token))
            except RateLimited:
                out.append("429")
                continue
            await adm.succeed(ticket, 1, 1, answer("echo", ticket.job_id))
            out.append("200")
        await asyncio.gather(*adm._settling)
        return out

    reject = Admission(
        config, auth, db=db, quotas=QuotaGate(db, limiter, redis_unavailable="reject")
    )

    async def run() -> None:  # one loop: the Redis client belongs to it
        assert await outcomes(4) == ["200", "200", "200", "429"]  # counted on Redis
        private_redis.kill()
        assert await outcomes(4) == ["200", "200", "200", "429"]  # counted in the store
        with pytest.raises(StoreUnavailable):
            await reject.admit(request(config, token))

    await run()
    db.close()
