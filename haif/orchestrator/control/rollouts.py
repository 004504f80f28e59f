"""The operator's rollouts made the fleet's (``haif.orchestrator.rollout`` says what a
rollout is): every ``rollouts.poll_s`` the store's rows are read, a model whose row
changed gets the versions it wants (the others retired and drained), and, on the
leader, the canary's state (starting, ready, failed and why) is written back to its row
for ``haif rollout status``.

Every replica reads the rollouts, so that their tables agree; only the leader starts
and stops workers (``FleetState``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from haif.orchestrator.rollout import Intent

if TYPE_CHECKING:
    from haif.orchestrator.control.store import ControlStore
    from haif.orchestrator.fleet_state import FleetState
    from haif.orchestrator.model_fleet import ModelFleet
    from haif.orchestrator.rollout import CanaryJudge

logger = logging.getLogger("haif.orchestrator")


class RolloutControl:
    """Applies the store's rollouts to the fleet.

    Args:
        fleet: the fleet's state.
        store: the metadata store (None: none, the config's versions alone).
        judge: the canary's judge: a version no longer rolled out is forgotten by it.
    """

    def __init__(self, fleet: FleetState, store: ControlStore | None, judge: CanaryJudge) -> None:
        self._fleet = fleet
        self._store = store
        self._judge = judge

    async def poll(self) -> bool:
        """Apply the operator's rollouts (one read per poll); whether the store answered."""
        if self._store is None:
            return False
        rows = await asyncio.to_thread(self._store.read_rollouts)
        if rows is None:
            return False
        state = self._fleet
        running: list[str] | None = None  # listed once, and only when a rollout changed
        for fleet in state.fleets.values():
            intent = Intent.of(fleet.model, rows.get(fleet.model.name))
            if intent != fleet.intent:
                if running is None:
                    running = await asyncio.to_thread(state.running)
                for version in state.want(fleet, intent, running):
                    self._judge.forget(fleet.model.name, version)
            if state.leader:
                await self._report_canary(fleet)
        return True

    async def _report_canary(self, fleet: ModelFleet) -> None:
        state = fleet.canary_state()
        if self._store is None or state is None or state == fleet.canary_status or not fleet.intent.generation:
            return
        try:
            await asyncio.to_thread(
                self._store.report_canary, fleet.model.name, fleet.intent.generation, state[0], state[1]
            )
            fleet.canary_status = state
        except Exception as exc:
            logger.warning("rollouts: cannot record the canary's state (%s)", type(exc).__name__)
