"""The canary's judge at work (``rollouts.max_error_rate``): the Gateways' outcomes per
version, reported with their long-polls, are counted for each model's canary
(``CanaryJudge``); a canary above the rate over the window is rolled back: the rollback
written to the store first (so that the next poll does not read the canary back), then
applied to the fleet.

Every replica judges on the reports it gets (a Gateway's long-poll reaches any replica);
the store's generation guard lets the first verdict through, and the leader drains the
canary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from haif.orchestrator.rollout import Intent

if TYPE_CHECKING:
    from haif.orchestrator.control.store import ControlStore
    from haif.orchestrator.fleet_state import FleetState
    from haif.orchestrator.model_fleet import ModelFleet
    from haif.orchestrator.rollout import CanaryJudge
    from haif.telemetry.metrics import OrchestratorMetrics

logger = logging.getLogger("haif.orchestrator")


class CanaryControl:
    """Judges each model's canary on the Gateways' outcomes; rolls a failing one back.

    Args:
        fleet: the fleet's state.
        store: the metadata store (None: no rollouts, no canary to judge).
        judge: the sliding window of each canary's outcomes.
        metrics: where automatic rollbacks are counted.
    """

    def __init__(
        self, fleet: FleetState, store: ControlStore | None, judge: CanaryJudge, metrics: OrchestratorMetrics
    ) -> None:
        self._fleet = fleet
        self._store = store
        self._judge = judge
        self._metrics = metrics
        self.auto_rollbacks = 0

    def take_outcomes(self, outcomes: dict[str, Any]) -> None:
        """A Gateway's ``{model: {version: [finished, platform errors]}}`` since its last
        report; only each model's canary is counted (a version rolled back is not)."""
        for model, versions in outcomes.items():
            fleet = self._fleet.fleets.get(model)
            canary = fleet.intent.canary if fleet is not None else None
            figures = versions.get(canary) if canary is not None else None
            if figures is None:
                continue
            finished, errors = int(figures[0]), int(figures[1])
            self._judge.add(model, canary, finished, errors)
            if errors:
                seen, failed = self._judge.rate(model, canary)
                logger.info(
                    "canary %s:%s: %d of %d requests failed on the platform's side in the last %g s",
                    model, canary, failed, seen, self._judge.config.window_s,
                )

    async def judge(self) -> None:
        """Roll back every canary whose verdict says so."""
        for fleet in self._fleet.fleets.values():
            canary = fleet.intent.canary
            if canary is None or self._store is None:
                continue
            reason = self._judge.verdict(fleet.model.name, canary)
            if reason is None:
                continue
            self._judge.forget(fleet.model.name, canary)
            # Written before it is applied: the next poll must not read the canary back.
            if not await self._rollback_in_store(fleet, reason):
                continue  # another replica's verdict, or the operator's change, came first
            self.auto_rollbacks += 1
            self._metrics.rolled_back(fleet.model.name, canary)
            logger.warning(
                "rollout of %s: canary %s %s", fleet.model.name, canary, reason,
                extra={"event": "rollout_auto_rollback", "model": fleet.model.name, "version": canary},
            )
            for version in self._fleet.want(fleet, Intent(stable=fleet.intent.stable), []):
                self._judge.forget(fleet.model.name, version)

    async def _rollback_in_store(self, fleet: ModelFleet, reason: str) -> bool:
        """Record the automatic rollback, unless the rollout changed since the canary was
        judged (its generation moved on: that change wins). Whether it was recorded."""
        store = self._store
        if store is None:
            return False
        model, version, generation = fleet.model.name, fleet.model.version, fleet.intent.generation
        return await asyncio.to_thread(store.rollback, model, version, reason, generation)
