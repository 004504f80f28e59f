"""Worker pools: the actors of one model, their health, and how a request picks one.

A ``ModelPool`` holds every worker of one model, each tagged with its region and tier
(``shared``, or the name of a tenant with a dedicated pool): the registry of
(model, tier, region) → workers. ``acquire`` picks a worker for a request:

1. candidate groups in order: the request's tier in its home region, then in the other
   regions (failover), then the shared tier the same way (a dedicated tenant whose own
   workers are all down still gets served);
2. within a group, live workers (ready, breaker not open) with a free slot, two chosen
   at random and the one with fewer requests in flight taken (power of two choices);
3. when every live worker is at ``max_concurrency``, the request waits in a bounded
   FIFO queue (``max_queued``); a full queue answers ``Overloaded`` (429) at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from haif.exceptions import (
    DeadlineExceeded,
    GpuUnavailable,
    HaifError,
    ModelLoadFailed,
    ModelNotReady,
    Overloaded,
    WorkerUnavailable,
    unwrap,
)
from haif.orchestrator.breaker import BreakerState, CircuitBreaker

if TYPE_CHECKING:
    from haif.config import ModelConfig, ResilienceConfig
    from haif.envelope import RequestContext
    from haif.orchestrator.placement import Placement

logger = logging.getLogger("haif.orchestrator")

SHARED_TIER = "shared"


@dataclass
class WorkerSlot:
    """One worker position of a pool; a replacement actor takes over the same slot."""

    worker_id: str
    actor: Any  # ray.actor.ActorHandle
    load_ref: Any | None  # ObjectRef of the pending load() call, None once settled
    breaker: CircuitBreaker
    region: str = "local"
    tier: str = SHARED_TIER
    capacity: int = 512
    state: str = "loading"  # loading | ready | failed | dead
    error: str | None = None
    in_flight: int = 0
    load_started: float = field(default_factory=time.monotonic)
    generation: int = 0  # bumped by each replacement
    probe_failures: int = 0
    deaths: int = 0
    ready_since: float | None = None  # monotonic time the current actor became ready
    died_at: float | None = None  # monotonic time this Orchestrator learned of the death
    replace_at: float | None = None  # monotonic time the replacement may start

    def live(self) -> bool:
        return self.state == "ready" and self.breaker.allows()


@dataclass(frozen=True)
class Route:
    """Where a request may go: its tier, then regions in order of preference."""

    tier: str
    regions: tuple[str, ...]


@dataclass
class ModelPool:
    model: ModelConfig
    placement: Placement | None
    placement_error: GpuUnavailable | None = None
    slots: list[WorkerSlot] = field(default_factory=list)
    overloaded_retry_after_s: float = 1.0
    rng: random.Random = field(default_factory=random.Random)
    _waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)
    rejected_overloaded: int = 0
    ever_ready: bool = False  # once served, a pool whose workers are all being replaced waits

    # --- state --------------------------------------------------------------------

    def refresh(self) -> None:
        """Settle finished load() calls without blocking."""
        pending = [s for s in self.slots if s.load_ref is not None]
        if not pending:
            return
        done, _ = ray.wait([s.load_ref for s in pending], num_returns=len(pending), timeout=0)
        done_set = set(done)
        for slot in pending:
            if slot.load_ref not in done_set:
                waited = time.monotonic() - slot.load_started
                if waited > self.model.load_timeout_s:
                    slot.state = "failed"
                    slot.error = f"load did not finish within load_timeout_s={self.model.load_timeout_s:g}"
                    slot.load_ref = None
                    ray.kill(slot.actor)
                    logger.error("worker %s: %s", slot.worker_id, slot.error)
                continue
            try:
                ray.get(slot.load_ref)
                slot.state, slot.error, slot.ready_since = "ready", None, time.monotonic()
                slot.breaker.success()
                self.ever_ready = True
                self._wake_all()
            except Exception as exc:  # the worker's load failure, recorded and reported
                err = unwrap(exc)
                slot.state = "failed"
                slot.error = err.message if isinstance(err, HaifError) else f"{type(err).__name__}: {err}"
                logger.error("worker %s failed to load: %s", slot.worker_id, slot.error)
                self._wake_all()  # requests waiting for it get the error now, not at their deadline
            slot.load_ref = None

    def status(self) -> dict[str, Any]:
        self.refresh()
        ready = sum(s.state == "ready" for s in self.slots)
        if self.placement_error is not None:
            state, error = "failed", self.placement_error.message
        elif ready:
            state, error = "ready", None
        elif any(s.state in ("loading", "dead") for s in self.slots):
            state, error = "loading", None  # dead workers are being replaced
        else:
            state = "failed"
            error = next((s.error for s in self.slots if s.error), "no workers")
        by_state = collections.Counter(s.state for s in self.slots)
        return {
            "state": state,
            "runtime": self.model.runtime,
            "device": "gpu" if self.placement and self.placement.use_gpu else "cpu",
            "workers": len(self.slots),
            "ready_workers": ready,
            "workers_by_state": dict(by_state),
            "in_flight": sum(s.in_flight for s in self.slots),
            "queued": self.queued,
            "rejected_overloaded": self.rejected_overloaded,
            "breakers": {s.worker_id: s.breaker.state.name.lower() for s in self.slots},
            "regions": sorted({s.region for s in self.slots}),
            "error": error,
        }

    # --- routing --------------------------------------------------------------------

    async def acquire(self, route: Route, ctx: RequestContext, avoid: frozenset[str]) -> WorkerSlot:
        """A worker for one call, its in-flight count taken (give it back with ``release``).

        ``avoid`` names workers this request already failed on; they are used only when
        nothing else is live.

        Raises:
            GpuUnavailable / ModelLoadFailed: the model cannot be served at all.
            ModelNotReady: its workers are still loading.
            WorkerUnavailable: no live worker (dead, or every breaker open).
            Overloaded: every live worker is busy and the queue is full.
            DeadlineExceeded: the request's deadline passed while it waited.
        """
        while True:
            slot = self._choose(route, avoid)
            if slot is not None:
                slot.in_flight += 1
                slot.breaker.before_call()
                return slot
            if len(self._waiters) >= self.model.max_queued:
                self.rejected_overloaded += 1
                raise Overloaded(
                    f"model {self.model.name!r} is at capacity: every worker is busy and "
                    f"{self.model.max_queued} requests are already queued; retry later",
                    retry_after_s=self.overloaded_retry_after_s,
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=ctx.remaining_s())
            except TimeoutError:
                raise DeadlineExceeded(
                    f"request {ctx.request_id} passed its deadline waiting for a worker of "
                    f"{self.model.name!r}"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def release(self, slot: WorkerSlot) -> None:
        slot.in_flight -= 1
        self._wake()

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

    def _groups(self, route: Route) -> list[list[WorkerSlot]]:
        tiers = [route.tier] if route.tier == SHARED_TIER else [route.tier, SHARED_TIER]
        regions = list(route.regions) + sorted({s.region for s in self.slots} - set(route.regions))
        return [
            [s for s in self.slots if s.tier == tier and s.region == region]
            for tier in tiers
            for region in regions
        ]

    def _choose(self, route: Route, avoid: frozenset[str]) -> WorkerSlot | None:
        if self.placement_error is not None:
            raise self.placement_error
        if not any(s.state == "ready" for s in self.slots):
            self.refresh()
        saw_live = False
        for prefer_untried in (True, False):
            for group in self._groups(route):
                live = [s for s in group if s.live() and not (prefer_untried and s.worker_id in avoid)]
                saw_live = saw_live or bool(live)
                free = [s for s in live if s.in_flight < s.capacity]
                if free:
                    return self._two_choices(free)
            if saw_live:
                return None  # live workers, all busy: queue
        if self.ever_ready and self._replacing():
            return None  # every worker died and is being replaced: wait for one (deadline-bound)
        raise self._no_live_worker()

    def _replacing(self) -> bool:
        return any(
            s.state == "dead" or (s.state == "loading" and s.generation > 0) for s in self.slots
        )

    def _two_choices(self, free: list[WorkerSlot]) -> WorkerSlot:
        if len(free) == 1:
            return free[0]
        a, b = self.rng.sample(free, 2)
        return a if a.in_flight <= b.in_flight else b

    def _no_live_worker(self) -> HaifError:
        name = self.model.name
        if any(s.state == "ready" for s in self.slots):
            return WorkerUnavailable(f"every worker of model {name!r} is failing (circuit open); retry")
        if any(s.state in ("loading", "dead") for s in self.slots):
            return ModelNotReady(f"model {name!r} is still loading (or replacing a dead worker)")
        error = next((s.error for s in self.slots if s.error), None)
        if error:
            return ModelLoadFailed(f"model {name!r} is not available: {error}")
        return WorkerUnavailable(f"model {name!r} has no live worker")

    # --- failures ---------------------------------------------------------------------

    def mark_dead(self, slot: WorkerSlot, reason: str, replacement_backoff_max_s: float) -> None:
        """Record a dead worker; the health loop replaces it after a backoff that doubles
        with each death of this slot (a worker that keeps dying is not restarted hot)."""
        if slot.state == "dead":
            return
        now = time.monotonic()
        if slot.ready_since is not None and now - slot.ready_since >= replacement_backoff_max_s:
            slot.deaths = 0  # it ran longer than the longest backoff: not a crash loop
        slot.state, slot.error, slot.ready_since = "dead", reason, None
        slot.breaker.trip()
        slot.deaths += 1
        slot.died_at = now
        delay = min(replacement_backoff_max_s, 0.5 * 2 ** (slot.deaths - 2)) if slot.deaths > 1 else 0.0
        slot.replace_at = slot.died_at + delay
        logger.error("worker %s is dead (%s); replacement in %.1fs", slot.worker_id, reason, delay)
        self._wake()

    def breaker_states(self) -> dict[str, BreakerState]:
        return {s.worker_id: s.breaker.state for s in self.slots}


def new_breaker(config: ResilienceConfig, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=config.breaker_failure_threshold,
        open_s=config.breaker_open_s,
        half_open_calls=config.breaker_half_open_calls,
        clock=clock,
    )
