"""The autoscaler's policy: how many workers one pool (a region and tier of one model
version) should have, from the requests it is asked to carry.

Ray Serve's policy, with its names (``autoscaling_config``; its replicas are workers
here): the wanted count is ``ceil(ongoing / target_ongoing_requests)`` within
``[min_workers, max_workers]``, where ``ongoing`` counts the requests running on the
pool's workers and those waiting for one in the Gateways' queues. A wanted count above
the current one must hold for ``upscale_delay_s`` before workers are added, one below
it for ``downscale_delay_s`` before surplus workers are drained, and never while some of
the pool's workers are still starting. A pool at zero with a request waiting gets a
worker at once (scale from zero): that request is waiting.

Pure: the Orchestrator feeds it the figures and applies its answer, so that it is tested
without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import AutoscalingConfig


@dataclass
class Decision:
    """One change the autoscaler made: ``current`` → ``wanted`` workers, and why."""

    at: float  # time.time()
    current: int
    wanted: int
    ongoing: float

    @property
    def direction(self) -> str:
        return "up" if self.wanted > self.current else "down"

    def describe(self) -> str:
        return (
            f"{self.direction} {self.current}→{self.wanted} ({self.ongoing:g} ongoing requests)"
        )


@dataclass
class PoolScaler:
    """The autoscaler of one pool: remembers since when the load asked for a change."""

    config: AutoscalingConfig
    _above_since: float | None = None
    _below_since: float | None = None
    last: Decision | None = None

    def wanted(self, ongoing: float) -> int:
        cfg = self.config
        count = math.ceil(ongoing / cfg.target_ongoing_requests) if ongoing > 0 else 0
        return min(cfg.max_workers, max(cfg.min_workers, count))

    def decide(
        self, now: float, current: int, ongoing: float, wall: float = 0.0, starting: bool = False
    ) -> int:
        """The pool's worker count from now on (``current`` when nothing changes).

        ``now``: a monotonic clock; ``wall``: ``time.time()`` for the decision record;
        ``starting``: some of the pool's workers are still starting (pending or loading):
        it is not scaled down meanwhile (what they were started for may be waiting).
        """
        cfg = self.config
        wanted = self.wanted(ongoing)
        if current == 0 and ongoing > 0:  # a request waits for a worker: at once
            return self._decided(max(1, wanted), current, ongoing, wall)
        if current < cfg.min_workers:  # below the floor (a worker was lost): at once
            return self._decided(cfg.min_workers, current, ongoing, wall)
        if current > cfg.max_workers:
            return self._decided(cfg.max_workers, current, ongoing, wall)
        if wanted > current:
            self._below_since = None
            if self._above_since is None:
                self._above_since = now
            if now - self._above_since >= cfg.upscale_delay_s:
                return self._decided(wanted, current, ongoing, wall)
        elif wanted < current and starting:
            self._above_since = self._below_since = None
        elif wanted < current:
            self._above_since = None
            if self._below_since is None:
                self._below_since = now
            if now - self._below_since >= cfg.downscale_delay_s:
                return self._decided(wanted, current, ongoing, wall)
        else:
            self._above_since = self._below_since = None
        return current

    def _decided(self, wanted: int, current: int, ongoing: float, wall: float) -> int:
        self._above_since = self._below_since = None
        if wanted != current:
            self.last = Decision(wall, current, wanted, ongoing)
        return wanted
