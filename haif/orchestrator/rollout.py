"""A model's rollout as the control plane applies it: which versions run, which get traffic.

The operator's intent is a row of the metadata store (``haif.store.rollouts``, written by
``haif rollout set|promote|rollback``): the stable version, a canary version and its
weight. The Orchestrator reads it every ``rollouts.poll_s`` and turns it into the fleet
(each wanted version's workers, in every region of the model; the others drained) and
into the routing table's weights, which is how it reaches the Gateways: never a
database read per request.

A canary gets its weight only once it is ready (a ready worker in every region of the
model); one whose workers cannot start (artifact refused, load failed, no room) keeps 0 %
and its status says why (written back to its row, so ``haif rollout status`` shows it).

The canary's judge (``rollouts.max_error_rate``): the Gateways report, with each
long-poll, how many requests each version finished and how many of them failed on the
platform's side; over a sliding ``window_s``, a canary above the rate (with at least
``min_requests``) is rolled back by the Orchestrator on its own.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import ModelConfig, RolloutsConfig
    from haif.store.rollouts import Rollout


@dataclass(frozen=True)
class Intent:
    """What the operator asked for one model (the config's version alone without a rollout)."""

    stable: str
    canary: str | None = None
    weight: int = 0  # the canary's percent
    generation: int = 0  # of the store's row (0: none)

    @classmethod
    def of(cls, model: ModelConfig, row: Rollout | None) -> Intent:
        """From the store's row; a row of another config version is stale (a redeploy
        with a new version supersedes it) and ignored."""
        if row is None or not row.applies_to(model.version):
            return cls(stable=model.version)
        return cls(
            stable=row.stable_version,
            canary=row.canary_version,
            weight=row.canary_weight if row.canary_version else 0,
            generation=row.generation,
        )

    @property
    def versions(self) -> tuple[str, ...]:
        return (self.stable,) if self.canary is None else (self.stable, self.canary)


def weights(intent: Intent, canary_ready: bool) -> tuple[tuple[str, int], ...]:
    """The table's traffic split: the canary's weight once it is ready, else all stable."""
    if intent.canary is None or not canary_ready or intent.weight <= 0:
        return ((intent.stable, 100),)
    if intent.weight >= 100:
        return ((intent.canary, 100),)
    return ((intent.stable, 100 - intent.weight), (intent.canary, intent.weight))


@dataclass
class CanaryJudge:
    """Platform errors of each (model, version) over a sliding window."""

    config: RolloutsConfig
    clock: collections.abc.Callable[[], float] = time.monotonic
    _seen: dict[tuple[str, str], collections.deque[tuple[float, int, int]]] = field(default_factory=dict)

    def add(self, model: str, version: str, finished: int, errors: int) -> None:
        if finished <= 0:
            return
        self._seen.setdefault((model, version), collections.deque()).append((self.clock(), finished, errors))

    def rate(self, model: str, version: str) -> tuple[int, int]:
        """(finished, platform errors) of ``version`` within the window."""
        seen = self._seen.get((model, version))
        if not seen:
            return 0, 0
        horizon = self.clock() - self.config.window_s
        while seen and seen[0][0] < horizon:
            seen.popleft()
        return sum(n for _, n, _ in seen), sum(e for _, _, e in seen)

    def verdict(self, model: str, version: str) -> str | None:
        """Why ``version`` must be rolled back, or None."""
        limit = self.config.max_error_rate
        if limit is None:
            return None
        finished, errors = self.rate(model, version)
        if finished < self.config.min_requests or errors / finished <= limit:
            return None
        return (
            f"rolled back automatically: {errors} of its last {finished} requests failed on the "
            f"platform's side ({errors / finished:.0%} > rollouts.max_error_rate {limit:.0%} "
            f"over {self.config.window_s:g} s)"
        )

    def forget(self, model: str, version: str) -> None:
        self._seen.pop((model, version), None)
