"""Quota reservation before dispatch and settlement after it, from the Gateway's side.

Requests per minute go to Redis when it is configured (one atomic script); the rest
(tokens per minute and per day, concurrent requests, and requests per minute without
Redis) is one statement, or one transaction, on the metadata store
(``haif.store.fastpath``, ``haif.store.ledger``).

Redis down (``quotas.redis_unavailable``): by default requests per minute are counted
in the metadata store instead, for ``quotas.redis_retry_after_s`` before Redis is
tried again, so limits still hold and nothing waits on a dead socket. The two counts
are separate windows: in the minute of a switch a tenant may get up to twice its
requests per minute. ``reject`` answers 503 (``StoreUnavailable``) instead.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from haif.exceptions import StoreUnavailable
from haif.store import fastpath
from haif.store.quotas import QuotaLimits

if TYPE_CHECKING:
    from datetime import datetime

    from haif.envelope import Principal, WorkItem
    from haif.gateway.lease import QuotaLeases
    from haif.gateway.ratelimit import RedisRateLimiter
    from haif.store.aio import AsyncWrites
    from haif.store.db import Database
    from haif.store.ledger import Existing, JobRequest, Outcome, Reservation

logger = logging.getLogger("haif.gateway")


def reservation_tokens(item: WorkItem, bytes_per_token: float) -> int:
    """Tokens to reserve: the most the request may generate plus an estimate of its prompt."""
    prompt = math.ceil(item.payload_bytes / bytes_per_token)
    if item.kind == "embedding":
        return prompt
    # n_inputs: prompts of a completion, 1 for chat; each prompt gets n_choices generations
    return prompt + item.max_tokens * item.n_inputs * item.n_choices


class QuotaGate:
    def __init__(
        self,
        db: Database,
        limiter: RedisRateLimiter | None,
        writes: AsyncWrites | None = None,
        *,
        leases: QuotaLeases | None = None,
        redis_unavailable: Literal["database", "reject"] = "database",
        redis_retry_after_s: float = 5.0,
    ) -> None:
        self._db = db
        self._limiter = limiter
        self._writes = writes  # PostgreSQL: the two writes from the event loop
        self.leases = leases  # PostgreSQL: most requests admitted from a lease, no round trip
        self._redis_unavailable = redis_unavailable
        self._redis_retry_after_s = redis_retry_after_s
        self._redis_down_until = 0.0

    @property
    def redis_down(self) -> bool:
        """Redis failed within the last ``redis_retry_after_s``."""
        return self._limiter is not None and time.monotonic() < self._redis_down_until

    @property
    def counts_requests_in_db(self) -> bool:
        return self._limiter is None

    async def reserve(
        self, principal: Principal, req: JobRequest, now: datetime, *, streamed: bool = False
    ) -> Reservation | Existing:
        """``streamed``: the client sees the job's id at once (its row is written at once).

        Raises: RateLimited, QuotaExceeded, UnprocessableRequest, Conflict, StoreUnavailable."""
        limits = principal.limits or QuotaLimits()
        if (
            self._limiter is not None
            and limits.requests_per_minute is not None
            and principal.tenant_id is not None
        ):
            req = await self._count_on_redis(
                self._limiter, principal.tenant_id, limits.requests_per_minute, req
            )
        if self.leases is not None:
            leased = await self.leases.reserve(req, now, streamed=streamed)
            if leased is not None:
                return leased
        if self._writes is not None:
            reserved = await self._writes.reserve(req, now)
            if reserved is not None:
                return reserved
            # An Idempotency-Key, or a refusal to explain exactly: the reference path.
            return await self._db.run(fastpath.reserve_job, self._db, req, now, fast=False)
        return await self._db.run(fastpath.reserve_job, self._db, req, now)

    async def _count_on_redis(
        self, limiter: RedisRateLimiter, tenant_id: int, rpm: int, req: JobRequest
    ) -> JobRequest:
        """Count the request on Redis; when Redis is down, the request the store must count."""
        if not self.redis_down:
            try:
                await limiter.hit(tenant_id, rpm)
                return req
            except StoreUnavailable:
                self._redis_down_until = time.monotonic() + self._redis_retry_after_s
                logger.warning(
                    "rate limits: Redis unavailable; %s for %.0f s",
                    "refusing requests"
                    if self._redis_unavailable == "reject"
                    else "counting in the metadata store",
                    self._redis_retry_after_s,
                )
        if self._redis_unavailable == "reject":
            raise StoreUnavailable("the rate limiter is unavailable; retry later")
        return replace(req, count_requests=True)

    async def settle(self, reservation: Reservation, outcome: Outcome) -> bool:
        record = reservation.recorded  # admitted on a lease: its row may not be written
        if record is not None and self._writes is not None and record.claim():
            return await self._writes.settle_unwritten(reservation, outcome, record.req, record.now)
        if record is not None:
            await record.ensure()
        if self._writes is not None:
            return await self._writes.settle(reservation, outcome)
        return await self._db.run(fastpath.settle_job, self._db, reservation, outcome)


