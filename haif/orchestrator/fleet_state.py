"""The fleet's state: every model's ``ModelFleet`` and the actor of each of its slots.

It owns the state and the mechanics of the actor slots: a version's slots made (the
running workers adopted), a pool grown to its target or its surplus marked to retire, a
slot filled with its actor (the running one adopted, else a new one started on the
leader) and its ``load()`` settled, and the routing table published from all of it. It
decides nothing: the health monitor (``haif.orchestrator.health``) and the control
policies (``haif.orchestrator.control``) read it and tell it what to do.

Only the leader (the replica of rank 0) starts and stops workers; a stand-by's slots wait,
``pending``, for the actors the leader starts, and are filled with them when they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray

from haif.exceptions import HaifError, unwrap
from haif.orchestrator.fleet import (
    ACTOR_GONE,
    RemoteSlot,
    Slot,
    app_workers,
    find_worker,
    new_slot,
    running_indices,
    stop_worker,
    stop_workers,
)
from haif.orchestrator.model_fleet import ModelFleet, VersionFleet
from haif.orchestrator.placement import Placement, plan_placements
from haif.orchestrator.rollout import Intent
from haif.orchestrator.table import RoutingTable, TableHost

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.store.rollouts import Rollout
    from haif.telemetry.metrics import MetricsTarget

logger = logging.getLogger("haif.orchestrator")

Pool = tuple[str, str]  # (region, tier)


def plan_fleets(config: HaifConfig, cluster_gpus: float) -> dict[str, ModelFleet]:
    """One ``ModelFleet`` per enabled model of ``config``, placed on a cluster of
    ``cluster_gpus`` GPUs (no slot yet: ``FleetState.start`` makes them)."""
    plans = plan_placements(config.models, cluster_gpus, config.total_workers)
    fleets: dict[str, ModelFleet] = {}
    for model in config.models:
        if not model.enabled:
            continue
        plan = plans[model.name]
        if not isinstance(plan, Placement):
            logger.error("%s", plan.message)
        elif plan.fell_back_to_cpu:
            logger.warning("model %s asked for a GPU; none free, running on CPU", model.name)
        remote = [RemoteSlot(key.lower(), model, config.model_regions(model)[0].name) for key in model.p2p_workers]
        fleets[model.name] = ModelFleet(config, model, plan, remote)
    return fleets


class FleetState:
    """Every model's fleet, the actors of its slots, and the routing table made of them.

    Args:
        config: HAIF's config (prepared).
        fleets: the models' fleets (``plan_fleets``).
        app: the Serve application's name (its workers' names start with it).
        leader: whether this replica starts, replaces and stops workers.
        worker: the worker actor class (``ray.remote(ModelWorker)``).
        host: where the table is published (the Gateways' long-poll).
        metrics_target: where a new worker pushes its metrics.
    """

    def __init__(
        self,
        config: HaifConfig,
        fleets: dict[str, ModelFleet],
        *,
        app: str,
        leader: bool,
        worker: Any,
        host: TableHost | None = None,
        metrics_target: MetricsTarget | None = None,
    ) -> None:
        self.config = config
        self.fleets = fleets
        self.app = app
        self.namespace = config.ray.namespace
        self.leader = leader
        self.host = host or TableHost()
        self.auth_epoch = 0  # the last auth change seen (haif.admin.audit.auth_changed)
        self._worker = worker
        self._metrics_target = metrics_target
        self._settling: set[asyncio.Task[None]] = set()

    def start(self, rows: Mapping[str, Rollout]) -> None:
        """At construction: each model's rollout (its store row in ``rows``, else the
        config's version) made its fleet, the running workers adopted; on the leader, the
        workers no slot wants stopped and the pools filled up."""
        running = app_workers(self.app, self.namespace)
        for fleet in self.fleets.values():
            fleet.intent = Intent.of(fleet.model, rows.get(fleet.model.name))
            for version in fleet.intent.versions:
                self.version(fleet, version, running)
        if self.leader:
            # Workers no slot wants (an earlier config, a version no longer rolled out) stop.
            wanted = {s.name for f in self.fleets.values() for s in f.slots}
            for name in stop_workers(self.app, self.namespace, keep=wanted):
                logger.warning("stopped worker %s: no slot of this config wants it", name)
        for fleet in self.fleets.values():
            for slot in fleet.slots:
                self.fill(fleet, slot)

    # --- what it reads -------------------------------------------------------------------

    def running(self) -> list[str]:
        """The names of the app's workers that run (blocking: a call to Ray's GCS)."""
        return app_workers(self.app, self.namespace)

    def find_slot(self, worker_id: str) -> tuple[Slot | None, VersionFleet | None]:
        for fleet in self.fleets.values():
            for vf in fleet.versions.values():
                for slot in vf.slots:
                    if worker_id in (slot.worker_id, slot.name):
                        return slot, vf
        return None, None

    def worker_samples(self) -> list[tuple[str, str, str, int]]:
        """(model, version, state, in flight) of every worker; read from the metrics pusher's thread."""
        return [
            (name, s.version, s.state, s.load) for name, f in list(self.fleets.items()) for s in list(f.slots)
        ]

    def weight_samples(self) -> list[tuple[str, str, int]]:
        out = []
        for name, fleet in list(self.fleets.items()):
            split = dict(fleet.weights())
            for version in list(fleet.versions):
                out.append((name, version, split.get(version, 0)))
        return out

    def publish(self) -> None:
        models = {name: f.routes() for name, f in self.fleets.items()}
        self.host.publish(RoutingTable.of(models, self.auth_epoch))

    def observe_auth_epoch(self, epoch: int) -> bool:
        """Carry auth change ``epoch`` to the Gateways (never backwards); whether it is new."""
        if epoch <= self.auth_epoch:
            return False
        self.auth_epoch = epoch
        return True

    # --- a version's slots -----------------------------------------------------------------

    def version(self, fleet: ModelFleet, version: str, running: list[str]) -> VersionFleet | None:
        """``fleet``'s workers of ``version``, created if new: the running ones adopted, the
        pools filled up to their count (on the leader; its stand-bys adopt them later)."""
        known = fleet.versions.get(version)
        if known is not None:
            return known
        if fleet.placement is None:
            return None
        try:
            model = fleet.model.at_version(version)
        except HaifError as exc:
            bad = VersionFleet(fleet.model.model_copy(update={"version": version}), [], fleet.pools)
            bad.error = exc.message
            fleet.versions[version] = bad
            return bad
        vf = VersionFleet(model, [], fleet.pools)
        for region, tier in fleet.pools:
            template = new_slot(self.config, model, region, tier, 0)
            indices = running_indices(running, template)
            if model.autoscaling is not None and indices:
                # A restarted Orchestrator keeps the size the autoscaler had reached.
                auto = model.autoscaling
                vf.targets[(region, tier)] = min(auto.max_workers, max(auto.min_workers, len(indices)))
            for index in indices:
                vf.slots.append(new_slot(self.config, model, region, tier, index))
            if self.leader:
                self.grow(vf, (region, tier))
                # More running than the pool's count (a redeploy with fewer `workers`): drained.
                self.shrink(vf, (region, tier), "more workers run than the config asks for")
        fleet.versions[version] = vf
        return vf

    def want(self, fleet: ModelFleet, intent: Intent, running: list[str]) -> list[str]:
        """Make ``intent`` the fleet's: start the versions it wants, retire the others'
        workers (the leader drains them). The versions retired."""
        before = fleet.intent
        fleet.intent = intent
        logger.info(
            "rollout of %s: stable %s, canary %s at %d%% (was stable %s, canary %s at %d%%)",
            fleet.model.name, intent.stable, intent.canary, intent.weight,
            before.stable, before.canary, before.weight,
        )
        for version in intent.versions:
            vf = self.version(fleet, version, running)
            if vf is not None and self.leader:
                for slot in vf.slots:
                    if slot.actor is None and slot.state == "pending":
                        self.fill(fleet, slot)
        retired = []
        for version, vf in list(fleet.versions.items()):
            if version in intent.versions:
                continue
            if not vf.slots:
                del fleet.versions[version]
                continue
            for slot in vf.slots:
                if not slot.retire:
                    slot.retire, slot.retire_reason = True, f"version {version} is no longer rolled out"
                if not self.leader and slot.state == "ready":
                    slot.state = "draining"  # the leader drains it: no new request from this table
            retired.append(version)
        return retired

    # --- a pool's slots --------------------------------------------------------------------

    def grow(self, vf: VersionFleet, pool: Pool) -> list[Slot]:
        """Add slots to ``pool`` up to its target (lowest free indices); the new slots."""
        added = []
        taken = {s.index for s in vf.in_pool(pool)}
        index = 0
        while len(vf.active(pool)) < vf.targets[pool]:
            while index in taken:
                index += 1
            slot = new_slot(self.config, vf.model, pool[0], pool[1], index)
            taken.add(index)
            vf.slots.append(slot)
            added.append(slot)
        return added

    def shrink(self, vf: VersionFleet, pool: Pool, reason: str) -> None:
        """Retire ``pool``'s surplus workers: not-ready ones first, then the highest index."""
        active = vf.active(pool)
        surplus = len(active) - vf.targets[pool]
        if surplus <= 0:
            return
        order = sorted(active, key=lambda s: (s.state == "ready", -s.index))
        for slot in order[:surplus]:
            slot.retire, slot.retire_reason = True, reason

    def fill_pool(self, fleet: ModelFleet, vf: VersionFleet, pool: Pool) -> None:
        """Grow ``pool`` to its target and give the new slots their actors."""
        for slot in self.grow(vf, pool):
            self.fill(fleet, slot)

    def fill_pools(self) -> None:
        """Pools below their count (a worker retired by the operator, a new version) grow."""
        for fleet in self.fleets.values():
            for vf in fleet.versions.values():
                if vf.version not in fleet.intent.versions or vf.error is not None:
                    continue
                for pool in vf.pools:
                    self.fill_pool(fleet, vf, pool)

    # --- a slot's actor --------------------------------------------------------------------

    def fill(self, fleet: ModelFleet, slot: Slot) -> None:
        """Give ``slot`` its actor: the running one of that name (adopted), else, on the
        leader, a new one; then (re)load it (instant on a worker that has the model)."""
        actor = find_worker(slot.name, self.namespace)
        if actor is None:
            if not self.leader:
                slot.state = "pending"  # the leader starts it; adopted at a later round
                return
            actor = self._start(fleet, slot)
        slot.adopt(actor)
        slot.load_ref = actor.load.remote(self.config.limits.object_ref_threshold_bytes)
        self._settle_when_loaded(fleet, slot, slot.load_ref)

    def stop(self, slot: Slot) -> None:
        """Stop ``slot``'s worker (a hung one: its name is freed for a new one)."""
        stop_worker(slot.name, self.namespace)

    def stop_all(self) -> list[str]:
        """Stop every worker of the app (it is being deleted); their names."""
        return stop_workers(self.app, self.namespace)

    def _start(self, fleet: ModelFleet, slot: Slot) -> Any:
        plan, model = fleet.placement, slot.model
        if plan is None:  # never: a fleet without a placement has no slots
            raise RuntimeError(f"model {model.name!r} has no placement")
        options = plan.actor_options(model.max_concurrency)
        region = next(r for r in self.config.regions if r.name == slot.region)
        if region.resource:
            # A sliver of the region's custom resource pins the worker to that region's nodes.
            options["resources"] = {region.resource: 0.001}
        if plan.needs_placement_group:
            options["scheduling_strategy"] = _tensor_parallel_strategy(plan, f"{slot.name}/pg")
        logger.info("starting worker %s (version %s)", slot.name, slot.version)
        return self._worker.options(
            name=slot.name,
            namespace=self.namespace,
            lifetime="detached",  # it outlives this replica; stop_workers() stops it
            get_if_exists=True,
            **options,
        ).remote(
            model,
            self.config.limits.max_prompt_tokens,
            str(self.config.base_path()),
            f"{model.name}/{slot.where}/{slot.index}",
            self.config.artifacts,
            metrics=self._metrics_target,
            telemetry=self.config.telemetry,
        )

    def _settle_when_loaded(self, fleet: ModelFleet, slot: Slot, load_ref: Any) -> None:
        """Take a worker into the table as soon as its load() returns, not at the next
        health round. (Outside the event loop, at construction, the health round does it.)"""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def settle() -> None:
            with contextlib.suppress(Exception):  # refresh() records a failed load
                await load_ref
            self.refresh(fleet)
            self.publish()

        task = loop.create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def refresh(self, fleet: ModelFleet) -> None:
        """Settle finished load() calls without blocking."""
        pending = [s for s in fleet.slots if s.load_ref is not None]
        if not pending:
            return
        done, _ = ray.wait([s.load_ref for s in pending], num_returns=len(pending), timeout=0)
        done_set = set(done)
        backoff_max_s = self.config.resilience.replacement_backoff_max_s
        for slot in pending:
            if slot.load_ref not in done_set:
                if slot.state == "pending":
                    slot.load_started = time.monotonic()  # not placed yet: its load has not begun
                elif time.monotonic() - slot.load_started > slot.model.load_timeout_s:
                    slot.state = "failed"
                    slot.error = f"load did not finish within load_timeout_s={slot.model.load_timeout_s:g}"
                    slot.load_ref = None
                    logger.error("worker %s: %s", slot.worker_id, slot.error)
                    if self.leader:
                        stop_worker(slot.name, self.namespace)
                continue
            try:
                ray.get(slot.load_ref)
                slot.state, slot.error, slot.ready_since = "ready", None, time.monotonic()
                fleet.ever_ready = True
            except ACTOR_GONE as exc:
                slot.mark_dead(type(exc).__name__, backoff_max_s)
            except Exception as exc:  # the worker's load failure, recorded and reported
                err = unwrap(exc)
                slot.state = "failed"
                slot.error = err.message if isinstance(err, HaifError) else f"{type(err).__name__}: {err}"
                logger.error("worker %s failed to load: %s", slot.worker_id, slot.error)
            slot.load_ref = None


def _tensor_parallel_strategy(plan: Placement, name: str) -> Any:
    """A placement group with one GPU bundle per tensor-parallel rank, packed on one node;
    detached and named after its worker, as the worker is (``stop_worker`` removes it).

    Child tasks are captured, so the engine's Ray workers land in its bundles.
    """
    from ray.util.placement_group import get_placement_group, placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    try:
        group = get_placement_group(name)
    except ValueError:
        group = placement_group(plan.placement_group_bundles(), strategy="STRICT_PACK", name=name, lifetime="detached")
    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
