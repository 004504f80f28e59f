"""The billing webhook exporter against a real HTTP receiver on loopback and PostgreSQL."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from sqlalchemy import select

from haif.config import UsageConfig
from haif.gateway.usage_export import UsageExporter
from haif.store import Database, migrate
from haif.store.db import create_db_engine
from haif.store.models import UsageBatch
from tests.support import services
from tests.support.store_cases import job, reserve, settle, tenant
from tests.support.webhook import WebhookReceiver


@pytest.fixture
def db(pg_server: str) -> Database:
    with services.fresh_database(pg_server, "haif_usage") as url:
        database = Database(create_db_engine(url, pool_size=2))
        migrate.upgrade(database.engine)
        yield database
        database.close()


def served_jobs(db: Database, n: int) -> list[str]:
    t = tenant(db)
    ids = []
    for _ in range(n):
        res = reserve(db, job(t))
        settle(db, res, 2, 3)
        ids.append(res.job_id)
    return ids


def config(url: str, **kw: object) -> UsageConfig:
    return UsageConfig(webhook_url=url, backoff_initial_s=0.05, backoff_max_s=0.2, **kw)


def test_backoff_is_exponential_with_full_jitter() -> None:
    exporter = UsageExporter.__new__(UsageExporter)
    exporter._config = UsageConfig(webhook_url="http://x", backoff_initial_s=0.5, backoff_max_s=4)
    exporter._rng = random.Random(0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        samples = [exporter.backoff_s(attempt) for _ in range(200)]
        assert 0 <= min(samples) and max(samples) <= cap and max(samples) > cap * 0.8


async def test_retries_until_delivered_then_moves_on(db: Database) -> None:
    ids = served_jobs(db, 7)
    with WebhookReceiver(fail_first=3) as receiver:
        exporter = UsageExporter(db, config(receiver.url, batch_size=5))

        async def run() -> list[int]:
            async with httpx.AsyncClient() as client:
                return [await exporter.export_once(client) for _ in range(3)]

        assert await run() == [5, 2, 0]
    assert receiver.attempts == 3 + 2 and len(receiver.deliveries) == 2
    assert list(receiver.records()) == ids  # every record, in order, once after de-duplication
    assert exporter.failed_attempts == 3 and exporter.delivered_batches == 2
    with db.connect() as conn:
        batches = conn.execute(select(UsageBatch.attempts, UsageBatch.delivered_at)).all()
    assert sorted(b.attempts for b in batches) == [1, 4] and all(b.delivered_at for b in batches)


async def test_a_batch_abandoned_mid_retry_is_resent_under_the_same_id(db: Database) -> None:
    served_jobs(db, 3)
    with WebhookReceiver(fail_first=10**6) as down:
        first = UsageExporter(db, config(down.url, lease_s=0.5))

        async def give_up() -> int:
            stop = asyncio.Event()
            async with httpx.AsyncClient() as client:
                task = asyncio.create_task(first.export_once(client, stop))
                while down.attempts < 2:
                    await asyncio.sleep(0.01)
                stop.set()  # this exporter stops while its batch is undelivered
                return await task

        assert await give_up() == 0
    with WebhookReceiver(fail_first=0) as up:
        second = UsageExporter(db, config(up.url, lease_s=0.5))

        async def resend() -> int:
            async with httpx.AsyncClient() as client:
                while True:  # until the first exporter's lease lapses
                    sent = await second.export_once(client)
                    if sent:
                        return sent
                    await asyncio.sleep(0.05)

        assert await asyncio.wait_for(resend(), 30) == 3
    with db.connect() as conn:
        (batch_id,) = conn.execute(select(UsageBatch.id)).scalars()
    assert up.deliveries[0]["batch_id"] == batch_id  # the receiver can tell it is the same batch
