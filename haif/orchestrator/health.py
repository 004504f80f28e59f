"""The fleet's health: one round probes every worker and acts on what it learns.

A round (every ``resilience.health_check_period_s``, and at once when a Gateway reports a
worker dead) settles the finished loads, probes the ready and draining workers (local
actors with ``ping``, remote P2P ones with ``haif.worker.health`` through the shim), marks
dead the ones that stop answering (``unhealthy_after_failures`` timeouts, the actor gone,
an engine that died), replaces them once their backoff has passed (on the leader), makes
a stand-by's fleet follow what the leader runs, reports the workers Ray cannot place yet
as ``pending``, and publishes the table.

It reads and changes the fleet's state (``haif.orchestrator.fleet_state``) and nothing
above it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import ray

from haif.exceptions import HaifError
from haif.handles import answer
from haif.orchestrator.fleet import ACTOR_GONE, RemoteSlot, Slot, new_slot, resolve, running_indices

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import ResilienceConfig
    from haif.orchestrator.fleet_state import FleetState

logger = logging.getLogger("haif.orchestrator")


class HealthMonitor:
    """Probes the fleet's workers, marks the dead ones, replaces them, follows the leader.

    Args:
        fleet: the fleet's state.
        resilience: the probes' period, timeout and failure count, the replacement backoff.
        p2p: the P2P shim's handle (remote P2P workers are probed through it), if it runs.
    """

    def __init__(
        self, fleet: FleetState, resilience: ResilienceConfig, p2p: DeploymentHandle | None = None
    ) -> None:
        self._fleet = fleet
        self._res = resilience
        self._p2p = p2p
        self.replacements = 0

    async def probe_workers(self) -> None:
        """Settle loads, probe ready workers, replace dead ones whose backoff has passed,
        adopt the leader's new workers, and publish the table."""
        state, res = self._fleet, self._res
        probes = []
        for fleet in state.fleets.values():
            state.refresh(fleet)
            probes += [self._probe(s) for s in fleet.slots if s.state in ("ready", "draining")]
            probes += [self._probe_remote(r) for r in fleet.remote]
        await asyncio.gather(*probes)
        if not state.leader:
            self._follow_leader(await asyncio.to_thread(state.running))
        now = time.monotonic()
        for fleet in state.fleets.values():
            for slot in fleet.slots:
                if slot.state == "pending" and slot.actor is None or (slot.state == "dead" and not state.leader):
                    state.fill(fleet, slot)  # adopt what the leader started
                elif slot.state == "dead" and res.replace_dead_workers and not slot.retire and (
                    slot.replace_at is not None and slot.replace_at <= now
                ):
                    self.replacements += 1
                    state.stop(slot)  # a hung one: its name is freed
                    state.fill(fleet, slot)
                    logger.warning("replacing dead worker of %s: %s", fleet.model.name, slot.worker_id)
        await self._mark_unplaced()
        state.publish()

    def _follow_leader(self, names: list[str]) -> None:
        """A stand-by's fleet is what runs (``names``): slots for the leader's new workers,
        none for the ones it stopped."""
        config = self._fleet.config
        running = set(names)
        for fleet in self._fleet.fleets.values():
            for vf in fleet.versions.values():
                vf.slots = [s for s in vf.slots if s.name in running or s.state == "ready"]
                for region, tier in vf.pools:
                    template = new_slot(config, vf.model, region, tier, 0)
                    have = {s.index for s in vf.in_pool((region, tier))}
                    for index in running_indices(sorted(running), template):
                        if index not in have:
                            vf.slots.append(new_slot(config, vf.model, region, tier, index))
            for version, vf in list(fleet.versions.items()):
                if not vf.slots and version not in fleet.intent.versions:
                    del fleet.versions[version]

    async def _probe(self, slot: Slot) -> None:
        res, leader = self._res, self._fleet.leader
        actor = slot.actor
        try:
            reply = await asyncio.wait_for(resolve(actor.ping.remote()), res.health_check_timeout_s)
        except TimeoutError:
            if slot.actor is not actor:
                return
            slot.probe_failures += 1
            if slot.probe_failures >= res.unhealthy_after_failures:
                if leader:
                    ray.kill(actor, no_restart=True)
                slot.mark_dead(f"{slot.probe_failures} health probes timed out", res.replacement_backoff_max_s)
            return
        except ACTOR_GONE as exc:
            if slot.actor is actor and slot.state != "draining":
                slot.mark_dead(type(exc).__name__, res.replacement_backoff_max_s)
            return
        # (state, in flight[, loaded adapters]): workers of an earlier release answer two.
        slot.probe_failures, slot.load = 0, reply[1]
        slot.adapters = frozenset(reply[2]) if len(reply) > 2 else frozenset()
        if reply[0] == "draining":  # the leader drains it: a stand-by learns it here
            slot.state = "draining"
        elif reply[0] == "dead" and slot.state != "draining":  # its engine died: replace it
            if leader:
                ray.kill(actor, no_restart=True)
            logger.warning("worker %s: its engine died; it is replaced", slot.worker_id)
            slot.mark_dead("its engine died", res.replacement_backoff_max_s)

    async def _probe_remote(self, slot: RemoteSlot) -> None:
        """``haif.worker.health`` of a remote P2P worker, through the shim. It is dead after
        ``unhealthy_after_failures`` failed probes, and ready again as soon as one answers."""
        reason: str | None = None
        if self._p2p is None:
            reason = "no P2P shim runs (p2p.enabled)"
        else:
            try:
                health = answer(await asyncio.wait_for(
                    self._p2p.worker_health.remote(slot.peer), self._res.health_check_timeout_s
                ))
                if health.get("model") not in (None, slot.model.name):
                    reason = f"the peer serves {health.get('model')!r}, not {slot.model.name!r}"
                elif health.get("state") != "ready":
                    reason = f"the peer is {health.get('state')!r}"
            except (TimeoutError, HaifError) as exc:
                reason = getattr(exc, "message", None) or "the health probe timed out"
            except Exception as exc:  # the shim's replica is down or restarting
                reason = f"the P2P shim did not answer ({type(exc).__name__})"
        if reason is None:
            slot.state, slot.error, slot.probe_failures = "ready", None, 0
            slot.load = int(health.get("in_flight", 0))
            return
        slot.probe_failures += 1
        slot.error = reason
        if slot.probe_failures >= self._res.unhealthy_after_failures and slot.state != "dead":
            logger.warning("P2P worker %s is down: %s", slot.worker_id, reason)
            slot.state = "dead"

    async def _mark_unplaced(self) -> None:
        """Workers Ray cannot place yet (no free GPU or CPU) are ``pending``, not loading:
        reported as such, and their load deadline starts once they run."""
        loading = {s.actor_id: s for f in self._fleet.fleets.values() for s in f.slots
                   if s.load_ref is not None and s.state in ("loading", "pending") and s.actor_id}
        if not loading:
            return
        try:
            from ray.util.state import list_actors

            pending = await asyncio.to_thread(
                list_actors, filters=[("state", "=", "PENDING_CREATION")], timeout=2,
                raise_on_missing_output=False,
            )
            unplaced = {a.actor_id for a in pending}
        except Exception:  # the state API is optional (no dashboard): loading it stays
            return
        for actor_id, slot in loading.items():
            if actor_id in unplaced:
                slot.state = "pending"
            elif slot.state == "pending":
                slot.state, slot.load_started = "loading", time.monotonic()
