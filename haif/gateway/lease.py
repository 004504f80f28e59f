"""Quota leases: the common request admitted with no database round trip on its path.

On PostgreSQL a Gateway replica takes a *lease* for a tenant: one conditional
``UPDATE`` counts a block of requests and tokens in the tenant's windows
(``fastpath._TAKE_LEASE``), and the replica hands the block out to that tenant's
requests from memory. A request without an Idempotency-Key, of a tenant without a
concurrency limit, is then admitted at once; its settlement (refund and usage, as
before) runs after the response, and writes the job's row too: a request admitted on a
lease costs one statement. Only a stream (its client reads the job's id in the first
chunk) and a job still running ``jobs.mark_running_after_s / 2`` after admission have
their row written before then (``JobRecord``).

What keeps the books exact:
- A lease only takes while at least as much again is left in every window, and at
  most ``quotas.lease_fraction`` of each limit (and ``lease_max_requests``). Near a
  limit there is no lease: each request is counted on its own, exactly as without
  leases, so "50 allowed → 50 served" still holds across replicas.
- A lease lives inside the windows it was counted in (it ends a second before the
  minute does) and at most ``lease_max_s``; what it did not hand out is given back to
  those windows when it ends, when it has been idle ``lease_idle_s``, when it is
  renewed, and when the replica stops.
- A request's reservation is the same as without leases: settlement refunds what it
  did not use, and a job left open is failed and refunded by the sweeper.

What it costs:
- Near a limit, another replica may answer 429 while this one still holds leased
  units, for at most ``lease_idle_s``; at most ``lease_fraction`` of a limit per
  replica is held that way.
- A replica that dies holds its leftovers until the window rolls (a day's tokens:
  at most one block per death).
- A short job's row appears when it settles, just after its response, not when it is
  admitted; a replica that dies leaves no row for its short jobs in flight (their
  tokens stay counted, like a lease's leftovers, until the window rolls).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from haif.store import fastpath
from haif.store.quotas import DAY, MINUTE

if TYPE_CHECKING:
    from collections.abc import Callable

    from haif.config import QuotasConfig
    from haif.store.aio import AsyncWrites
    from haif.store.ledger import JobRequest, Reservation

logger = logging.getLogger("haif.gateway")

# A lease is not used in the last second of its windows: another replica's clock may
# roll the window a little early.
WINDOW_MARGIN = timedelta(seconds=1)


@dataclass
class Lease:
    tenant_id: int
    minute_start: datetime  # the windows it was counted in, as the database started them
    day_start: datetime
    until: datetime  # not used from then on
    requests: int | None  # left to hand out; None: not counted in the database
    tokens: int | None
    last_used: datetime
    live: bool = True

    def fits(self, tokens: int, now: datetime) -> bool:
        return (
            self.live
            and now < self.until
            and (self.requests is None or self.requests >= 1)
            and (self.tokens is None or self.tokens >= tokens)
        )

    def take(self, tokens: int, now: datetime) -> int:
        """Hand out one request of ``tokens``; the tokens it reserves (0: not counted)."""
        self.last_used = now
        if self.requests is not None:
            self.requests -= 1
        if self.tokens is None:
            return 0
        self.tokens -= tokens
        return tokens

    @property
    def leftover(self) -> tuple[int, int]:
        return self.requests or 0, self.tokens or 0


class JobRecord:
    """The row of a job admitted on a lease.

    Written only once the job has run ``delay_s`` (from then on it may be looked up,
    marked running or swept as abandoned). A shorter job, the common one, never has it
    written on its own: its settlement inserts it closed, in the settlement's one
    statement (``claim``). Settlement paths that need the row first ``ensure`` it.
    """

    def __init__(
        self, writes: AsyncWrites, req: JobRequest, now: datetime, tokens: int, delay_s: float
    ) -> None:
        self._writes, self.req, self.now, self._tokens = writes, req, now, tokens
        self.task: asyncio.Future[None] | None = None  # the timer's write, once started
        self._attempted = False  # a write of the open row was started (it may have landed)
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._start)

    def _start(self) -> None:
        if self._attempted:  # ensure() wrote it meanwhile
            return
        self._attempted = True
        self.task = asyncio.ensure_future(self._write())
        self.task.add_done_callback(self._done)

    async def _write(self) -> None:
        await self._writes.record_job(self.req, self.now, self._tokens)

    def _done(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "job %s: its row was not written (%s); settlement writes it",
                self.req.job_id,
                task.exception(),
            )

    def claim(self) -> bool:
        """True while no write of the open row was ever started: the caller's settlement
        inserts the row closed (a retry of it finds the row and changes nothing). False:
        the row may exist open, so settlement ``ensure``s it and updates it."""
        if not self._attempted:
            self._timer.cancel()  # the settlement writes it; the timer never will
        return not self._attempted

    async def ensure(self) -> None:
        """The row exists once this returns (open, unless a settlement closed it).
        Raises: StoreUnavailable."""
        self._timer.cancel()
        self._attempted = True
        if self.task is not None:
            try:
                await asyncio.shield(self.task)
                return
            except asyncio.CancelledError:
                if not self.task.cancelled():
                    raise  # the caller was cancelled, not the write
            except Exception:  # noqa: BLE001 - logged in _done; written again just below
                pass
        await self._write()
        self.task = asyncio.get_running_loop().create_future()
        self.task.set_result(None)


class QuotaLeases:
    """This replica's leases, one per tenant."""

    def __init__(
        self,
        writes: AsyncWrites,
        config: QuotasConfig,
        on_event: Callable[[str], None] | None = None,
        *,
        record_after_s: float = 0.5,
    ) -> None:
        self._writes = writes
        self._config = config
        self._record_after_s = record_after_s  # a leased job's row, if it runs that long
        self._on_event = on_event  # "taken" / "returned", for the metrics
        self._leases: dict[int, Lease] = {}
        self._renewing: dict[int, asyncio.Future[Lease | None]] = {}  # takes in flight
        self._returns: set[asyncio.Future[None]] = set()
        # Tenants whose last lease did not fit (near a limit): their requests take the
        # per-request path without trying again until then, so they pay one round trip.
        self._no_lease_until: dict[int, datetime] = {}
        self.taken = 0  # leases taken
        self.returned = 0  # leases that gave something back

    def __len__(self) -> int:
        return len(self._leases)

    async def reserve(
        self, req: JobRequest, now: datetime, *, streamed: bool = False
    ) -> Reservation | None:
        """Admit ``req`` on a lease; None when the exact, per-request path must decide
        (an Idempotency-Key, a concurrency limit, a limit too close or too small to lease
        from, or a refusal). ``streamed``: its client reads the job's id in the first
        chunk and may look the job up, so its row is written at once, beside the dispatch.

        Raises: StoreUnavailable (taking a lease)."""
        limits = req.limits
        if req.idempotency_key is not None or limits.max_concurrent is not None:
            return None
        if not fastpath._needs_lock(limits, req.count_requests):
            return self._admit(req, now, 0, streamed=streamed)  # nothing to count
        lease = self._leases.get(req.tenant_id)
        # Checked again after every wait: other requests may have used up the lease
        # between its take and this request's turn.
        while lease is None or not lease.fits(req.tokens, now):
            until = self._no_lease_until.get(req.tenant_id)
            if until is not None and now < until:
                return None
            lease = await self._renew(req, now)
            if lease is None:
                return None
        # Counted in the lease's windows: its refund goes there while they are open (a
        # settlement refunds windows that started at or before ``reserved_at``).
        counted_at = max(now, lease.minute_start, lease.day_start)
        return self._admit(req, now, lease.take(req.tokens, now), counted_at, streamed=streamed)

    def _admit(
        self,
        req: JobRequest,
        now: datetime,
        tokens: int,
        counted_at: datetime | None = None,
        *,
        streamed: bool,
    ) -> Reservation:
        delay_s = 0.0 if streamed else self._record_after_s
        return fastpath._reservation(
            req,
            counted_at or now,
            tokens,
            False,
            recorded=JobRecord(self._writes, req, now, tokens, delay_s),
        )

    def _block(self, req: JobRequest) -> tuple[int, int] | None:
        """The requests and tokens to lease for ``req``'s tenant, or None: not worth one."""
        cfg, limits = self._config, req.limits
        requests = cfg.lease_max_requests
        if req.count_requests and limits.requests_per_minute is not None:
            requests = min(requests, int(limits.requests_per_minute * cfg.lease_fraction))
        if requests < 2:
            return None
        tokens = requests * req.tokens
        for limit in (limits.tokens_per_minute, limits.tokens_per_day):
            if limit is not None:
                tokens = min(tokens, int(limit * cfg.lease_fraction))
        if limits.counts_tokens and tokens < 2 * max(req.tokens, 1):
            return None
        return (requests if req.count_requests else 0), tokens

    async def _renew(self, req: JobRequest, now: datetime) -> Lease | None:
        """The tenant's lease, renewed if it must be: one take per tenant at a time; the
        requests that arrive meanwhile wait for it and use what it took."""
        tenant_id = req.tenant_id
        while True:
            lease = self._leases.get(tenant_id)
            if lease is not None and lease.fits(req.tokens, now):
                return lease
            pending = self._renewing.get(tenant_id)
            if pending is None:
                break
            await asyncio.wait([pending])  # its outcome is the lease table; errors are its own
            until = self._no_lease_until.get(tenant_id)
            if until is not None and now < until:
                return None
        # A task of its own: a request cancelled while the take is in flight must not lose
        # what the database has already counted.
        take = asyncio.ensure_future(self._take(req, now))
        self._renewing[tenant_id] = take
        take.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen, if orphaned
        return await asyncio.shield(take)

    async def _take(self, req: JobRequest, now: datetime) -> Lease | None:
        try:
            return await self._take_now(req, now)
        finally:
            self._renewing.pop(req.tenant_id, None)  # this take's own entry: renewals wait on it

    async def _take_now(self, req: JobRequest, now: datetime) -> Lease | None:
        self._retire(req.tenant_id)
        block = self._block(req)
        if block is None:
            return None
        got = await self._writes.take_lease(req.tenant_id, *block, now)
        if got is None:
            self._no_lease_until[req.tenant_id] = now + timedelta(seconds=self._config.lease_idle_s)
            return None
        self._no_lease_until.pop(req.tenant_id, None)
        self.taken += 1
        if self._on_event is not None:
            self._on_event("taken")
        counted_requests, counted_tokens, minute_start, day_start = got
        lease = Lease(
            tenant_id=req.tenant_id,
            minute_start=minute_start,
            day_start=day_start,
            until=min(
                minute_start + MINUTE - WINDOW_MARGIN,
                day_start + DAY - WINDOW_MARGIN,
                now + timedelta(seconds=self._config.lease_max_s),
            ),
            # 0 counted where something was asked: that limit is off in the database.
            requests=counted_requests if block[0] and counted_requests else None,
            tokens=None if block[1] and not counted_tokens else counted_tokens,
            last_used=now,
        )
        self._retire(req.tenant_id)  # never two leases of one tenant: the older gives back
        self._leases[req.tenant_id] = lease
        if not lease.fits(req.tokens, now):  # the window is about to roll
            self._retire(req.tenant_id)
            return None
        return lease

    def _retire(self, tenant_id: int) -> None:
        """End the tenant's lease; what it did not hand out goes back in the background."""
        lease = self._leases.pop(tenant_id, None)
        if lease is None:
            return
        lease.live = False
        requests, tokens = lease.leftover
        if requests or tokens:
            task = asyncio.ensure_future(self._give_back(lease, requests, tokens))
            self._returns.add(task)
            task.add_done_callback(self._returns.discard)

    async def _give_back(self, lease: Lease, requests: int, tokens: int) -> None:
        try:
            await self._writes.return_lease(
                lease.tenant_id, requests, tokens, lease.minute_start, lease.day_start
            )
            self.returned += 1
            if self._on_event is not None:
                self._on_event("returned")
        except Exception as exc:  # noqa: BLE001 - the window's roll frees them
            logger.warning(
                "tenant %s: leased quota not given back (%s); it is freed when its window rolls",
                lease.tenant_id,
                exc,
            )

    def tick(self, now: datetime | None = None) -> None:
        """Retire the leases that ended or sat idle ``lease_idle_s``."""
        now = now or datetime.now(UTC)
        idle = timedelta(seconds=self._config.lease_idle_s)
        for tenant_id, lease in list(self._leases.items()):
            if now >= lease.until or now - lease.last_used >= idle:
                self._retire(tenant_id)
        for tenant_id in [t for t, until in self._no_lease_until.items() if now >= until]:
            del self._no_lease_until[tenant_id]

    async def close(self) -> None:
        """Give every lease's leftovers back and wait for those writes."""
        if self._renewing:  # a take in flight lands first, then goes back with the rest
            await asyncio.wait(list(self._renewing.values()))
        for tenant_id in list(self._leases):
            self._retire(tenant_id)
        if self._returns:
            await asyncio.gather(*self._returns, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        period = min(self._config.lease_idle_s / 2, 0.5)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=period)
                except TimeoutError:
                    pass
                self.tick()
        finally:
            await self.close()
