"""Job upkeep off the hot path: mark long jobs running, fail stale ones, forget old keys.

A request's own writes are its reservation and its settlement. A job still executing
after ``jobs.mark_running_after_s`` is marked running here, in one statement for all
such jobs of this replica; short jobs never cost that write. Jobs left open by a
Gateway that died are failed after their deadline plus ``jobs.stale_after_s``, which
refunds their reservation and frees their concurrency slot (exactly once: settlement
only closes open jobs). Jobs whose settlement this replica holds for retry (the store
was down) are not stale: their real outcome, and their usage, are on the way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from haif.exceptions import HaifError
from haif.store import ledger
from haif.store.ledger import Outcome
from haif.store.models import JobState

if TYPE_CHECKING:
    from collections.abc import Collection

    from haif.config import HaifConfig
    from haif.store.db import Database

logger = logging.getLogger("haif.gateway")


class JobUpkeep:
    def __init__(
        self, db: Database, config: HaifConfig, pending: Collection[str] = frozenset()
    ) -> None:
        self._db = db
        self._pending = pending  # settlements queued on this replica (a live view)
        self._jobs = config.jobs
        self._stale_s = config.server.request_timeout_s + config.jobs.stale_after_s
        self._open: dict[str, float] = {}  # job id → monotonic time of dispatch
        self._last_sweep = 0.0

    def started(self, job_id: str) -> None:
        self._open[job_id] = time.monotonic()

    def finished(self, job_id: str) -> None:
        self._open.pop(job_id, None)

    @property
    def tick_s(self) -> float:
        return min(max(self._jobs.mark_running_after_s / 2, 0.05), self._jobs.sweep_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except HaifError as exc:  # the store is down: try again next tick
                logger.warning("job upkeep skipped: %s", exc.message)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.tick_s)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        now = time.monotonic()
        due = [j for j, t in self._open.items() if now - t >= self._jobs.mark_running_after_s]
        if due:
            for job_id in due:
                self._open.pop(job_id, None)  # marked once; settlement closes it either way
            await self._db.run(_mark_running, self._db, due)
        if now - self._last_sweep >= self._jobs.sweep_interval_s:
            self._last_sweep = now
            await self._db.run(
                _sweep, self._db, self._stale_s, self._jobs.idempotency_ttl_s, set(self._pending)
            )


def _mark_running(db: Database, job_ids: list[str]) -> None:
    with db.begin() as conn:
        ledger.mark_running(conn, job_ids, datetime.now(UTC))


def _sweep(db: Database, stale_s: float, key_ttl_s: float, pending: set[str]) -> int:
    now = datetime.now(UTC)
    with db.begin() as conn:
        stale = ledger.stale_jobs(conn, now - timedelta(seconds=stale_s), exclude=pending)
    failed = 0
    for res in stale:
        outcome = Outcome(
            JobState.FAILED,
            finished_at=now,
            error="abandoned: its Gateway stopped before settling it",
        )
        with db.begin() as conn:
            failed += ledger.settle(conn, res, outcome)
    if failed:
        logger.warning("failed %d abandoned jobs and released their reservations", failed)
    with db.begin() as conn:
        ledger.forget_idempotency_keys(conn, now - timedelta(seconds=key_ttl_s))
    return failed
