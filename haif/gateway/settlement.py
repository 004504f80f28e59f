"""Settlement that survives the metadata store (and Redis) going away.

A job's settlement closes its row once (``ledger.settle`` only closes open jobs),
refunds its reservation and records its usage; a job that failed finally is closed
``dead_lettered`` and its entry goes to the DLQ. When the store refuses that write,
the settlement is kept in a bounded in-memory queue of this Gateway replica and
retried with exponential backoff and jitter until the store is back: an admitted job
is never left open for the sweeper to misreport. The sweeper skips the jobs queued
here (``pending``); settlement being idempotent, a retry after a sweep changes nothing.

The order for a dead letter: the job row is closed first, and only the request that
closed it puts the entry, so a job has at most one entry. With the DLQ in the
metadata store (the embedded default, or Redis known down) the close and the entry
are one transaction; with Redis, the entry is kept and retried until Redis or the
table takes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from haif.dlq import _table
from haif.exceptions import StoreUnavailable
from haif.store import ledger

if TYPE_CHECKING:
    from haif.config import JobsConfig
    from haif.dlq import DeadLetter, DeadLetterQueue
    from haif.gateway.quota import QuotaGate
    from haif.store.db import Database
    from haif.store.ledger import Outcome, Reservation

logger = logging.getLogger("haif.gateway")


@dataclass
class _Pending:
    reservation: Reservation
    outcome: Outcome
    entry: DeadLetter | None = None
    closed: bool = False  # the job row is closed (by this settlement); only the entry is left


class Settlements:
    def __init__(
        self, quotas: QuotaGate, db: Database, dlq: DeadLetterQueue | None, jobs: JobsConfig
    ) -> None:
        self._quotas = quotas
        self._db = db
        self.dlq = dlq
        self._jobs = jobs
        self._queue: collections.deque[_Pending] = collections.deque()
        self.pending: set[str] = set()  # job ids queued here: the sweeper leaves them alone
        self._wake: asyncio.Event | None = None
        self.dropped = 0  # settlements lost to a full queue (the sweeper closes their jobs)

    def __len__(self) -> int:
        return len(self._queue)

    async def settle(
        self, reservation: Reservation, outcome: Outcome, entry: DeadLetter | None = None
    ) -> None:
        """Settle now, or queue it for retry when the store is down (never raises for that)."""
        pending = _Pending(reservation, outcome, entry)
        if not await self._attempt(pending):
            self._enqueue(pending)

    async def _attempt(self, p: _Pending) -> bool:
        """One try; True when nothing is left to do."""
        try:
            if not p.closed:
                if p.entry is not None and (self.dlq is None or not self.dlq.redis_usable()):
                    if p.reservation.recorded is not None:  # admitted on a lease: its row first
                        await p.reservation.recorded.ensure()
                    await self._db.run(
                        _close_with_entry, self._db, p.reservation, p.outcome, p.entry
                    )
                    return True
                closed = await self._quotas.settle(p.reservation, p.outcome)
                if not closed or p.entry is None:
                    return True  # closed before (a retry, or the sweeper): nothing to add
                p.closed = True
            if self.dlq is not None:
                await self._db.run(self.dlq.put, p.entry)
            return True
        except StoreUnavailable as exc:
            logger.warning("job %s: settlement deferred: %s", p.reservation.job_id, exc.message)
            return False

    def _enqueue(self, p: _Pending) -> None:
        if len(self._queue) >= self._jobs.settle_queue_max:
            self.dropped += 1
            logger.error(
                "job %s: settlement queue full (%d); the sweeper will close the job",
                p.reservation.job_id,
                len(self._queue),
            )
            return
        self._queue.append(p)
        self.pending.add(p.reservation.job_id)
        if self._wake is not None:
            self._wake.set()

    async def retry_once(self) -> int:
        """Retry queued settlements in order until one fails; how many were done."""
        done = 0
        while self._queue:
            p = self._queue[0]
            if not await self._attempt(p):
                break
            self._queue.popleft()
            self.pending.discard(p.reservation.job_id)
            done += 1
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Retry queued settlements with exponential backoff and jitter until ``stop``."""
        self._wake = asyncio.Event()
        delay = self._jobs.settle_retry_initial_s
        while not stop.is_set():
            if not self._queue:
                self._wake.clear()
                await _first(stop.wait(), self._wake.wait())
                continue
            await self.retry_once()
            if not self._queue:
                delay = self._jobs.settle_retry_initial_s
                continue
            await _first(stop.wait(), asyncio.sleep(delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, self._jobs.settle_retry_max_s)


def _close_with_entry(db: Database, res: Reservation, out: Outcome, entry: DeadLetter) -> bool:
    """Close the job dead-lettered and write its entry, in one transaction."""
    with db.begin() as conn:
        closed = ledger.settle(conn, res, out)
        if closed:
            _table.put(conn, entry)
    return closed


async def _first(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[arg-type]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
