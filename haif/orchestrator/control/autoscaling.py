"""The autoscaler at work: each pool's ``PoolScaler`` (``haif.orchestrator.autoscale``,
the pure policy) fed, every round, with the requests its workers run and, for the
model's first pool of its stable version, the ones waiting in the Gateways' queues
(reported with their long-polls); its answer applied to the fleet (workers added, or
the surplus retired and drained). A Gateway holding requests for a model scaled to zero
asks for a worker at once (``demand``).

The leader alone acts (``FleetState`` starts workers only there).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import ResilienceConfig
    from haif.orchestrator.fleet_state import FleetState, Pool
    from haif.orchestrator.model_fleet import ModelFleet, VersionFleet
    from haif.telemetry.metrics import OrchestratorMetrics

logger = logging.getLogger("haif.orchestrator")


class AutoscaleControl:
    """Scales each pool of the fleet to what its autoscaler decides.

    Args:
        fleet: the fleet's state.
        resilience: the table's refresh period (how long a Gateway's queue report holds).
        metrics: where the decisions are counted.
    """

    def __init__(self, fleet: FleetState, resilience: ResilienceConfig, metrics: OrchestratorMetrics) -> None:
        self._fleet = fleet
        self._res = resilience
        self._metrics = metrics
        # Requests waiting per model, as each Gateway last reported: (when, {model: n}).
        self._queued: dict[str, tuple[float, dict[str, int]]] = {}

    def take_queued(self, gateway: str, queued: dict[str, int]) -> None:
        """A Gateway's requests waiting for a worker, by model."""
        self._queued[gateway] = (time.monotonic(), queued)

    def period_s(self) -> float | None:
        """How often a round should run: the shortest ``metrics_interval_s`` (None: no
        model autoscales)."""
        periods = [
            f.model.autoscaling.metrics_interval_s for f in self._fleet.fleets.values() if f.model.autoscaling
        ]
        return min(periods) if periods else None

    def scale(self) -> None:
        """One round: every autoscaled pool of a wanted version asked for its count."""
        now, wall = time.monotonic(), time.time()
        for fleet in self._fleet.fleets.values():
            for vf in fleet.versions.values():
                if not vf.scalers or vf.version not in fleet.intent.versions:
                    continue
                for pool, scaler in vf.scalers.items():
                    current = vf.targets[pool]
                    starting = any(s.state in ("pending", "loading") for s in vf.active(pool))
                    wanted = scaler.decide(now, current, self._ongoing(fleet, vf, pool), wall, starting)
                    if wanted == current:
                        continue
                    vf.targets[pool] = wanted
                    decision = scaler.last
                    direction = "up" if wanted > current else "down"
                    self._metrics.autoscaled(fleet.model.name, direction)
                    logger.info(
                        "autoscale %s version %s in %s: %s", fleet.model.name, vf.version, "/".join(pool),
                        decision.describe() if decision else f"{current}→{wanted}",
                        extra={"event": "autoscale", "model": fleet.model.name, "version": vf.version,
                               "direction": direction, "workers": wanted},
                    )
                    if wanted > current:
                        self._fleet.fill_pool(fleet, vf, pool)
                    else:
                        self._fleet.shrink(vf, pool, f"scaled down to {wanted}")

    def demand(self, model: str) -> None:
        """A Gateway holds requests for ``model``, which has no worker (scaled to zero):
        start one now, not at the next round."""
        fleet = self._fleet.fleets.get(model)
        if fleet is None or not self._fleet.leader:
            return
        vf = fleet.versions.get(fleet.intent.stable)
        if vf is None or not vf.scalers:
            return
        pool = fleet.pools[0]
        if vf.targets[pool] == 0:
            scaler = vf.scalers[pool]
            vf.targets[pool] = scaler.decide(time.monotonic(), 0, 1.0, time.time())
            self._metrics.autoscaled(model, "up")
            logger.info("autoscale %s: a request waits and no worker runs; starting one", model,
                        extra={"event": "autoscale", "model": model, "direction": "up", "workers": vf.targets[pool]})
            self._fleet.fill_pool(fleet, vf, pool)
            self._fleet.publish()

    def _ongoing(self, fleet: ModelFleet, vf: VersionFleet, pool: Pool) -> float:
        """Requests the pool is asked to carry: running on its workers, plus (in the model's
        first pool of its stable version) the ones waiting in the Gateways' queues."""
        ongoing = float(vf.load(pool))
        if vf.version == fleet.intent.stable and pool == fleet.pools[0]:
            horizon = time.monotonic() - 3 * self._res.routing_table_refresh_s - 1.0
            ongoing += sum(
                q.get(fleet.model.name, 0) for at, q in self._queued.values() if at >= horizon
            )
        return ongoing
