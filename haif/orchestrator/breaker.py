"""Circuit breakers and retry backoff: the pure parts of the Orchestrator's resilience.

A ``CircuitBreaker`` guards one backend (a worker actor, later a remote P2P worker)::

    closed ──(failure_threshold failures in a row)──▶ open
      ▲                                                │ (open_s elapsed)
      │                                                ▼
      └────────(a trial call succeeds)──────────── half-open ──(a trial fails)──▶ open

While open it refuses work, so requests go to healthy workers at once instead of
timing out against a sick one. ``Backoff`` gives exponential backoff with full jitter
(AWS Architecture Blog, "Exponential Backoff and Jitter"): the n-th wait is uniform in
[0, min(max, initial·2ⁿ)], which spreads the retries of many clients apart.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class BreakerState(enum.IntEnum):
    """Ordered as exported in metrics: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class CircuitBreaker:
    failure_threshold: int
    open_s: float
    half_open_calls: int = 1
    clock: Callable[[], float] = time.monotonic
    _state: BreakerState = BreakerState.CLOSED
    _failures: int = 0
    _opened_at: float = 0.0
    _trials: int = 0  # trial calls let through while half-open
    opened_count: int = field(default=0)

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.open_s:
            self._state, self._trials = BreakerState.HALF_OPEN, 0
        return self._state

    def allows(self) -> bool:
        """Whether a call may go to this backend now (does not take a trial slot)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self._trials < self.half_open_calls

    def before_call(self) -> None:
        """Record that a call is sent (takes a trial slot when half-open)."""
        if self.state is BreakerState.HALF_OPEN:
            self._trials += 1

    def success(self) -> None:
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._state, self._trials = BreakerState.CLOSED, 0

    def failure(self) -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self.trip()

    def trip(self) -> None:
        """Open now (a probe or a death showed the backend is unusable)."""
        if self._state is not BreakerState.OPEN:
            self.opened_count += 1
        self._state, self._opened_at, self._trials = BreakerState.OPEN, self.clock(), 0


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        cap = min(self.max_s, self.initial_s * (2 ** max(retry - 1, 0)))
        return self.rng.uniform(0.0, cap)
