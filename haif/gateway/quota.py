"""Quota reservation before dispatch and settlement after it, from the Gateway's side.

Requests per minute go to Redis when it is configured (one atomic script); the rest
(tokens per minute and per day, concurrent requests, and requests per minute without
Redis) is one statement, or one transaction, on the metadata store
(``haif.store.fastpath``, ``haif.store.ledger``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from haif.store import fastpath
from haif.store.quotas import QuotaLimits

if TYPE_CHECKING:
    from datetime import datetime

    from haif.envelope import Principal, WorkItem
    from haif.gateway.ratelimit import RedisRateLimiter
    from haif.store.aio import AsyncWrites
    from haif.store.db import Database
    from haif.store.ledger import Existing, JobRequest, Outcome, Reservation


def reservation_tokens(item: WorkItem, bytes_per_token: float) -> int:
    """Tokens to reserve: the most the request may generate plus an estimate of its prompt."""
    prompt = math.ceil(item.payload_bytes / bytes_per_token)
    if item.kind == "embedding":
        return prompt
    return prompt + item.max_tokens * item.n_inputs  # n_inputs: prompts of a completion, 1 for chat


class QuotaGate:
    def __init__(
        self, db: Database, limiter: RedisRateLimiter | None, writes: AsyncWrites | None = None
    ) -> None:
        self._db = db
        self._limiter = limiter
        self._writes = writes  # PostgreSQL: the two writes from the event loop

    @property
    def counts_requests_in_db(self) -> bool:
        return self._limiter is None

    async def reserve(
        self, principal: Principal, req: JobRequest, now: datetime
    ) -> Reservation | Existing:
        """Raises: RateLimited, QuotaExceeded, UnprocessableRequest, Conflict, StoreUnavailable."""
        limits = principal.limits or QuotaLimits()
        if (
            self._limiter is not None
            and limits.requests_per_minute is not None
            and principal.tenant_id is not None
        ):
            await self._limiter.hit(principal.tenant_id, limits.requests_per_minute)
        if self._writes is not None:
            reserved = await self._writes.reserve(req, now)
            if reserved is not None:
                return reserved
            # An Idempotency-Key, or a refusal to explain exactly: the reference path.
            return await self._db.run(fastpath.reserve_job, self._db, req, now, fast=False)
        return await self._db.run(fastpath.reserve_job, self._db, req, now)

    async def settle(self, reservation: Reservation, outcome: Outcome) -> bool:
        if self._writes is not None:
            return await self._writes.settle(reservation, outcome)
        return await self._db.run(fastpath.settle_job, self._db, reservation, outcome)


