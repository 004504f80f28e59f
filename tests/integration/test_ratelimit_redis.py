"""Requests per minute on a real Redis: a burst is counted exactly, in few round trips."""

from __future__ import annotations

import asyncio

import pytest
import redis

from haif.config import RedisConfig
from haif.exceptions import RateLimited, StoreUnavailable
from haif.gateway.ratelimit import MAX_BATCH, RedisRateLimiter
from tests.support import services

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def private_redis():  # noqa: ANN201
    with services.own_redis() as server:
        yield server


async def outcomes(limiter: RedisRateLimiter, tenant: int, rpm: int, n: int) -> list[str]:
    async def one() -> str:
        try:
            await limiter.hit(tenant, rpm)
        except RateLimited as exc:
            assert exc.retry_after_s >= 1
            return "429"
        except StoreUnavailable:
            return "503"
        return "200"

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_a_burst_beyond_the_connection_pool_is_counted_exactly(
    private_redis: services.OwnRedis,
) -> None:
    """redis-py's pool holds 100 connections; 600 concurrent hits share pipelines instead."""
    limiter = RedisRateLimiter(RedisConfig(url=private_redis.url, key_prefix="burst"))

    async def run() -> None:
        got = await outcomes(limiter, 1, 50, 600)
        assert got.count("200") == 50 and got.count("429") == 550, set(got)
        assert limiter.round_trips <= 600 // MAX_BATCH + 2  # not one per request
        await limiter.close()

    await run()


async def test_a_script_redis_lost_is_loaded_again(private_redis: services.OwnRedis) -> None:
    limiter = RedisRateLimiter(RedisConfig(url=private_redis.url, key_prefix="flush"))
    plain = redis.Redis.from_url(private_redis.url)

    async def run() -> None:
        assert await outcomes(limiter, 2, 3, 2) == ["200", "200"]
        plain.script_flush()  # as after a restart of Redis without persistence
        assert sorted(await outcomes(limiter, 2, 3, 3)) == ["200", "429", "429"]
        await limiter.close()

    await run()
    plain.close()


async def test_redis_gone_answers_every_waiter(private_redis: services.OwnRedis) -> None:
    limiter = RedisRateLimiter(
        RedisConfig(url=private_redis.url, key_prefix="gone", socket_timeout_s=0.5)
    )

    async def run() -> None:
        assert await outcomes(limiter, 3, 100, 5) == ["200"] * 5
        private_redis.kill()
        try:
            got = await asyncio.wait_for(outcomes(limiter, 3, 100, 300), 30)
            assert got == ["503"] * 300
        finally:
            private_redis.start()
        assert await outcomes(limiter, 3, 100, 5) == ["200"] * 5  # back: counted again
        await limiter.close()

    await run()
