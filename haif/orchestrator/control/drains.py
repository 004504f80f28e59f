"""Drains: a worker leaves the fleet without failing a request.

A worker is retired (by a scale-down, a version no longer rolled out, a redeploy with
fewer workers, or ``haif workers drain WORKER_ID``: then a replacement starts in its
pool first). It drains once its pool has another ready worker (or needs none): the table
says ``draining`` (the Gateways send it nothing new, and it refuses what still comes),
the requests it has finish within ``drain_timeout_s``, it keeps refusing until every
Gateway holds a table without it, and it stops. A version left without a worker goes.

The leader alone drains (it alone stops workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from haif.orchestrator.fleet import resolve

if TYPE_CHECKING:
    from haif.config import ResilienceConfig
    from haif.orchestrator.control.store import ControlStore
    from haif.orchestrator.fleet import Slot
    from haif.orchestrator.fleet_state import FleetState
    from haif.orchestrator.model_fleet import ModelFleet, VersionFleet

logger = logging.getLogger("haif.orchestrator")


class DrainControl:
    """Takes the operator's drain requests and drains the fleet's retired workers.

    Args:
        fleet: the fleet's state.
        store: the metadata store (None: no drain requests).
        resilience: probe timeout and table refresh (how long a drained worker keeps refusing).
        poll_s: how often the stand-bys read the rollouts (``rollouts.poll_s``).
    """

    def __init__(
        self, fleet: FleetState, store: ControlStore | None, resilience: ResilienceConfig, poll_s: float
    ) -> None:
        self._fleet = fleet
        self._store = store
        self._res = resilience
        self._poll_s = poll_s
        self._draining: dict[str, asyncio.Task[None]] = {}  # slot name -> its drain

    async def take_requests(self) -> None:
        """``haif workers drain WORKER_ID``: a replacement starts in the worker's pool, and
        the worker drains once the pool has another ready worker."""
        store = self._store
        if store is None:
            return
        try:
            asked = await asyncio.to_thread(store.pending_drains)
        except Exception:
            return
        for worker_id in asked:
            slot, vf = self._fleet.find_slot(worker_id)
            if slot is None or vf is None:
                outcome = f"no worker {worker_id!r} in this deployment"
            elif slot.retire or slot.state == "draining":
                outcome = "already draining"
            else:
                slot.retire, slot.retire_reason = True, "drained by the operator"
                self._fleet.fill_pool(self._fleet.fleets[vf.model.name], vf, slot.pool)
                outcome = "draining: it stops once its replacement is ready and its requests are done"
            logger.info("drain of worker %s: %s", worker_id, outcome)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(store.finish_drain, worker_id, outcome)

    def advance(self) -> None:
        """Retired workers drain once their pool has another ready worker (or needs none);
        drained ones stop; versions left with no worker go."""
        for fleet in self._fleet.fleets.values():
            for version, vf in list(fleet.versions.items()):
                for slot in list(vf.slots):
                    if slot.name in self._draining:
                        continue
                    if slot.state == "draining":  # adopted mid-drain (this replica restarted)
                        self._drain(fleet, vf, slot)
                    elif slot.retire:
                        others = [s for s in vf.active(slot.pool) if s.state == "ready"]
                        stays = version in fleet.intent.versions and vf.targets[slot.pool] > 0
                        if slot.state != "ready" or others or not stays:
                            self._drain(fleet, vf, slot)
                if not vf.slots and version not in fleet.intent.versions:
                    del fleet.versions[version]

    def _drain(self, fleet: ModelFleet, vf: VersionFleet, slot: Slot) -> None:
        """No new request for ``slot`` (the table says draining; the worker refuses any that
        still come); the ones it has finish within ``drain_timeout_s``; then it stops."""
        timeout_s = slot.model.drain_timeout_s
        was = slot.state
        slot.state, slot.drain_started = "draining", time.monotonic()
        self._fleet.publish()  # the Gateways stop sending it requests now
        logger.info("draining worker %s: %s", slot.worker_id, slot.retire_reason or "retired")

        async def drain() -> None:
            left = 0
            try:
                if slot.actor is not None and was in ("ready", "loading", "draining"):
                    left = await asyncio.wait_for(
                        resolve(slot.actor.drain.remote(timeout_s)), timeout_s + self._res.health_check_timeout_s
                    )
                    # Idle; it goes on refusing (the Gateway sends those requests elsewhere)
                    # until every Gateway has a table without it, then it stops.
                    await asyncio.sleep(self._grace_s())
                    left = await asyncio.wait_for(
                        resolve(slot.actor.drain.remote(0.0)), self._res.health_check_timeout_s
                    ) or left
            except Exception as exc:  # gone already, or hung: it is stopped all the same
                logger.info("drain of %s ended: %s", slot.worker_id, type(exc).__name__)
            if left:
                logger.warning(
                    "worker %s stopped with %d request(s) still running after drain_timeout_s=%g",
                    slot.worker_id, left, timeout_s,
                )
            self._fleet.stop(slot)
            if slot in vf.slots:
                vf.slots.remove(slot)
            self._draining.pop(slot.name, None)
            logger.info("worker %s drained and stopped", slot.worker_id)
            self._fleet.publish()

        self._draining[slot.name] = asyncio.get_running_loop().create_task(drain())

    def _grace_s(self) -> float:
        """How long a drained, idle worker keeps refusing before it stops: long enough for
        every Gateway to hold a table that no longer routes to it: a stand-by replica learns
        of a drain from the worker's next probe (a rollout's, within a store poll), and a
        Gateway's long-poll answers within a refresh."""
        res = self._res
        return 2 * res.routing_table_refresh_s + max(res.health_check_period_s, self._poll_s) + 0.5
