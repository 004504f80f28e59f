"""The workers of one model as a Gateway replica sees them: which one a request gets.

``ModelRouter.acquire`` picks a worker for one call:

1. candidate groups in order: the request's tier in its home region, then in the other
   regions (failover), then the shared tier the same way (a dedicated tenant whose own
   workers are all down still gets served);
2. within a group, live workers (ready, breaker not open, not seen dead here) with a
   free slot, two chosen at random and the less loaded taken (power of two choices). A
   worker's load is this replica's own count of its requests, or the count the worker
   last reported through the table (every Gateway's), whichever is higher, so that
   several Gateway replicas stay balanced. A request for a LoRA adapter prefers the
   workers that reported it loaded (warm), unless the least loaded of them carries more
   than ``adapter_spill_margin`` requests over the least loaded other worker: then one of
   those gets it and loads it, so a hot adapter spreads instead of being pinned to one
   worker (the trap of Ray issue 65691);
3. when every live worker is at capacity, the request waits in a bounded FIFO queue
   (``max_queued``, per model and Gateway replica); a full queue answers ``Overloaded``
   (429) at once.

Versions: a request carries the version the traffic split gave it (``ModelRoutes.weights``,
picked at admission); only that version's workers are tried, unless none of them is
live (all dead, draining, or gone after a rollback): then the other versions are, the
stable one first, as a region fails over. A draining worker takes no new request. A
model scaled to zero (``ModelRoutes.scaled_to_zero``) keeps its requests waiting
(deadline-bound) and asks the Orchestrator for a worker (``demand``).
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from haif.exceptions import (
    DeadlineExceeded,
    GpuUnavailable,
    HaifError,
    ModelLoadFailed,
    ModelNotReady,
    Overloaded,
    WorkerUnavailable,
)
from haif.orchestrator.breaker import CircuitBreaker
from haif.orchestrator.table import SHARED_TIER, ModelRoutes, WorkerRoute

if TYPE_CHECKING:
    from haif.config import ResilienceConfig
    from haif.envelope import RequestContext


# While requests wait for a model scaled to zero, the Orchestrator is asked this often.
DEMAND_EVERY_S = 1.0


def new_breaker(config: ResilienceConfig, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=config.breaker_failure_threshold,
        open_s=config.breaker_open_s,
        half_open_calls=config.breaker_half_open_calls,
        clock=clock,
    )


@dataclass(frozen=True)
class Route:
    """Where a request may go: its tier, then regions in order of preference."""

    tier: str
    regions: tuple[str, ...]


@dataclass
class Backend:
    """One worker as this Gateway replica knows it: the table's row plus what it saw itself."""

    route: WorkerRoute
    breaker: CircuitBreaker
    in_flight: int = 0  # this replica's requests on it
    dead_at: float | None = None  # monotonic time this replica saw it die
    draining: bool = False  # it refused a request as draining (before the table said so)

    @property
    def worker_id(self) -> str:
        return self.route.worker_id

    @property
    def actor(self) -> Any:
        return self.route.actor

    @property
    def region(self) -> str:
        return self.route.region

    @property
    def version(self) -> str:
        return self.route.version

    @property
    def load(self) -> int:
        return max(self.in_flight, self.route.load)

    def live(self) -> bool:
        return (
            self.route.state == "ready" and self.dead_at is None and not self.draining
            and self.breaker.allows()
        )


@dataclass
class ModelRouter:
    """The workers of one model as this replica routes to them, and its request queue."""

    routes: ModelRoutes
    max_queued: int
    overloaded_retry_after_s: float
    new_breaker: Callable[[], CircuitBreaker]
    # Called with each worker that joins: the Router pings it, so that this process learns
    # the actor's address before a request waits for it (seconds, on a loaded machine).
    connect: Callable[[WorkerRoute], None] = lambda _route: None
    # Called (at most every DEMAND_EVERY_S) while requests wait for a model scaled to zero:
    # the Gateway asks the Orchestrator for a worker.
    demand: Callable[[str], None] = lambda _model: None
    backends: dict[str, Backend] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    adapter_spill_margin: int = 4
    _waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)
    rejected_overloaded: int = 0
    _demanded_at: float = float("-inf")
    # Requests inside acquire() that had to wait and have no worker yet. Not len(_waiters):
    # a table update wakes every waiter at once, and until each looks again, none is in it.
    _waiting: int = 0

    @property
    def name(self) -> str:
        return self.routes.name

    def update(self, routes: ModelRoutes) -> None:
        """Take a new table row: new workers join, gone ones leave (their requests in flight
        finish on the actor they hold), known ones keep their breaker and counts."""
        self.routes = routes
        backends: dict[str, Backend] = {}
        for route in routes.workers:
            known = self.backends.get(route.worker_id)
            if known is None:
                backends[route.worker_id] = Backend(route, self.new_breaker())
                self.connect(route)
                continue
            known.route = route
            backends[route.worker_id] = known
        self.backends = backends
        self._wake_all()  # waiters look again: a worker may have become ready

    # --- routing --------------------------------------------------------------------

    async def acquire(
        self, route: Route, ctx: RequestContext, avoid: frozenset[str], adapter: str | None = None,
        version: str | None = None,
    ) -> Backend:
        """A worker for one call, its in-flight count taken (give it back with ``release``).

        ``avoid`` names workers this request already failed on; they are used only when
        nothing else is live. ``adapter``: the LoRA adapter it runs through (warm workers
        first, see the module docstring). ``version``: the model version it was given
        (None: any).

        Raises:
            GpuUnavailable / ModelLoadFailed: the model cannot be served at all.
            ModelNotReady: its workers are still loading.
            WorkerUnavailable: no live worker (dead, or every breaker open).
            Overloaded: every live worker is busy and the queue is full.
            DeadlineExceeded: the request's deadline passed while it waited.
        """
        waited = False
        try:
            while True:
                backend = self._choose(route, avoid, adapter, version)
                if backend is not None:
                    backend.in_flight += 1
                    backend.breaker.before_call()
                    return backend
                if not waited:
                    waited = True
                    self._waiting += 1
                await self._wait(ctx)
        finally:
            if waited:
                self._waiting -= 1

    async def _wait(self, ctx: RequestContext) -> None:
        """Wait in the bounded FIFO queue for a worker to free up (or the table to change)."""
        if len(self._waiters) >= self.max_queued:
            self.rejected_overloaded += 1
            raise Overloaded(
                f"model {self.name!r} is at capacity: every worker is busy and "
                f"{self.max_queued} requests are already queued; retry later",
                retry_after_s=self.overloaded_retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=ctx.remaining_s())
        except TimeoutError:
            raise DeadlineExceeded(
                f"request {ctx.request_id} passed its deadline waiting for a worker of {self.name!r}"
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    @property
    def queued(self) -> int:
        """Requests waiting for a worker of this model in this replica."""
        return self._waiting

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends.values())

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        self._wake()

    def saw_dead(self, backend: Backend) -> bool:
        """Route around ``backend`` from now on; True the first time this replica sees it."""
        if backend.dead_at is not None:
            return False
        backend.dead_at = time.monotonic()
        backend.breaker.trip()
        self._wake_all()  # waiters may fail over now
        return True

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        """Let the oldest waiter look again (it re-checks; a spurious wake is harmless)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _versions(self, version: str | None) -> list[str | None]:
        """The versions to try, in order: the request's, then the stable one, then the
        others by weight (None: one pass over every worker)."""
        if version is None:
            return [None]
        weighted = [v for v, _ in sorted(self.routes.weights, key=lambda vw: -vw[1])]
        present = sorted({b.version for b in self.backends.values()})
        order = [version, self.routes.stable, *weighted, *present]
        return list(dict.fromkeys(order))

    def _groups(self, route: Route, version: str | None = None) -> list[list[Backend]]:
        backends = [b for b in self.backends.values() if version is None or b.version == version]
        tiers = [route.tier] if route.tier == SHARED_TIER else [route.tier, SHARED_TIER]
        regions = list(route.regions) + sorted({b.region for b in backends} - set(route.regions))
        return [
            [b for b in backends if b.route.tier == tier and b.region == region]
            for tier in tiers
            for region in regions
        ]

    def _choose(
        self, route: Route, avoid: frozenset[str], adapter: str | None = None, version: str | None = None
    ) -> Backend | None:
        if self.routes.unplaceable is not None:
            raise GpuUnavailable(self.routes.unplaceable)
        for candidate in self._versions(version):
            saw_live = False
            for prefer_untried in (True, False):
                for group in self._groups(route, candidate):
                    live = [b for b in group if b.live() and not (prefer_untried and b.worker_id in avoid)]
                    saw_live = saw_live or bool(live)
                    free = [b for b in live if b.in_flight < b.route.capacity]
                    if free and adapter is not None:
                        return self._with_adapter(free, adapter)
                    if free:
                        return self._two_choices(free)
                if saw_live:
                    return None  # live workers of this version, all busy: queue
        if self.routes.scaled_to_zero:
            self._ask_for_worker()
            return None  # a worker is being started for it: wait (deadline-bound)
        if self.routes.ever_ready and self._replacing():
            return None  # every worker died and is being replaced: wait for one (deadline-bound)
        raise self._no_live_worker()

    def _ask_for_worker(self) -> None:
        now = time.monotonic()
        if now - self._demanded_at >= DEMAND_EVERY_S:
            self._demanded_at = now
            self.demand(self.name)

    def saw_draining(self, backend: Backend) -> None:
        """``backend`` refused a request as draining: no more requests for it here."""
        backend.draining = True
        self._wake_all()

    def _replacing(self) -> bool:
        return self.routes.replacing or any(b.dead_at is not None for b in self.backends.values())

    def _with_adapter(self, free: list[Backend], adapter: str) -> Backend:
        warm = [b for b in free if adapter in b.route.adapters]
        cold = [b for b in free if adapter not in b.route.adapters]
        if not warm or not cold:
            return self._two_choices(warm or cold)
        if min(b.load for b in warm) - min(b.load for b in cold) > self.adapter_spill_margin:
            return self._two_choices(cold)  # the warm ones are busy: another one loads it
        return self._two_choices(warm)

    def _two_choices(self, free: list[Backend]) -> Backend:
        if len(free) == 1:
            return free[0]
        a, b = self.rng.sample(free, 2)
        return a if a.load <= b.load else b

    def _no_live_worker(self) -> HaifError:
        name = self.name
        states = [b.route.state for b in self.backends.values()]
        if "ready" in states:
            return WorkerUnavailable(f"every worker of model {name!r} is failing (circuit open); retry")
        if any(s in ("loading", "dead") for s in states) or self.routes.replacing:
            return ModelNotReady(f"model {name!r} is still loading (or replacing a dead worker)")
        if self.routes.error:
            return ModelLoadFailed(f"model {name!r} is not available: {self.routes.error}")
        if not states:
            return ModelNotReady(f"model {name!r} has no worker yet")
        return WorkerUnavailable(f"model {name!r} has no live worker")

    def status(self) -> dict[str, Any]:
        """This replica's view: queue, requests in flight, breakers."""
        return {
            "queued": self.queued,
            "in_flight": self.in_flight,
            "rejected_overloaded": self.rejected_overloaded,
            "breakers": {b.worker_id: b.breaker.state.name.lower() for b in self.backends.values()},
        }
