"""The Orchestrator: HAIF's control plane, a Ray Serve deployment off the request path.

It owns the worker fleet (``haif.orchestrator.fleet``): places each model's workers
(GPU pinning, CPU fallback, tensor-parallel placement groups, regions and tiers),
probes their health, replaces dead ones with backoff, and publishes the routing table
(``haif.orchestrator.table``) that every Gateway replica holds and routes with. No
request passes through it: a Gateway calls the workers itself.

However many replicas run, there is one fleet. Workers are named actors, so every
replica sees the same ones; the replica of rank 0 leads: it alone starts, replaces and
stops workers, while the others adopt what it started and publish the same table (any
replica answers a Gateway's long-poll). A replica that dies leaves the workers running;
the replica Serve starts in its place adopts them.

Beside health, a control loop (every ``rollouts.poll_s``, and every autoscaler's
``metrics_interval_s``) applies the operator's rollouts (``haif.orchestrator.rollout``:
each wanted version's workers, the others drained; the traffic split published in the
table), the drain requests of ``haif workers drain``, the autoscaler of each pool
(``haif.orchestrator.autoscale``) fed with the workers' loads and the Gateways' queues
(reported with their long-polls), and the canary's judge. Every replica reads the
rollouts, so that the tables agree; only the leader acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.worker import ModelWorker
from haif.exceptions import HaifError, unwrap
from haif.handles import answer
from haif.orchestrator.autoscale import PoolScaler
from haif.orchestrator.fleet import (
    RemoteSlot,
    Slot,
    app_workers,
    find_worker,
    new_slot,
    pools_of,
    running_indices,
    stop_worker,
    stop_workers,
)
from haif.orchestrator.placement import Placement, plan_placements
from haif.orchestrator.rollout import CanaryJudge, Intent, weights
from haif.orchestrator.table import ModelRoutes, RoutingTable, TableHost
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs
from haif.telemetry.metrics import MetricsTarget, OrchestratorMetrics, ProcessMetrics

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig, ModelConfig
    from haif.exceptions import GpuUnavailable

logger = logging.getLogger("haif.orchestrator")

_ACTOR_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
# A Gateway's long-poll is answered within this, whatever it asks for.
MAX_LISTEN_S = 60.0


class VersionFleet:
    """The workers of one version of a model: its slots, pool by pool, and their autoscalers."""

    def __init__(self, model: ModelConfig, slots: list[Slot], pools: list[tuple[str, str]]) -> None:
        self.model = model  # the model as this version serves it (ModelConfig.at_version)
        self.version = model.version
        self.slots = slots
        self.pools = pools
        # Workers each pool should have: ``workers``, or what its autoscaler decided.
        self.targets: dict[tuple[str, str], int] = {pool: model.initial_workers for pool in pools}
        self.scalers = (
            {pool: PoolScaler(model.autoscaling) for pool in pools} if model.autoscaling is not None else {}
        )
        self.error: str | None = None  # the version cannot run at all (no such artifact name)

    def in_pool(self, pool: tuple[str, str]) -> list[Slot]:
        return [s for s in self.slots if s.pool == pool]

    def active(self, pool: tuple[str, str]) -> list[Slot]:
        """The pool's workers that stay (not draining, not to be retired)."""
        return [s for s in self.in_pool(pool) if not s.retire and s.state != "draining"]

    def ready(self) -> int:
        return sum(s.state == "ready" for s in self.slots)

    def load(self, pool: tuple[str, str]) -> int:
        return sum(s.load for s in self.in_pool(pool) if s.state in ("ready", "draining"))

    def failure(self) -> str | None:
        """Why this version cannot serve, when none of its workers is ready and one failed."""
        if self.error is not None:
            return self.error
        if self.ready():
            return None
        return next((s.error for s in self.slots if s.state == "failed" and s.error), None)

    def ready_everywhere(self, regions: list[str]) -> bool:
        return all(any(s.state == "ready" and s.region == r for s in self.slots) for r in regions)


class ModelFleet:
    """One model: its versions' workers, the rollout applied to them, its placement."""

    def __init__(
        self, config: HaifConfig, model: ModelConfig, plan: Placement | GpuUnavailable,
        remote: list[RemoteSlot] | None = None,
    ) -> None:
        self.model = model
        self.placement = plan if isinstance(plan, Placement) else None
        self.placement_error = None if isinstance(plan, Placement) else plan
        self.pools = pools_of(config, model)
        self.regions = [r.name for r in config.model_regions(model)]
        self.versions: dict[str, VersionFleet] = {}
        self.intent = Intent(stable=model.version)
        self.canary_status: tuple[str, str | None] | None = None  # last reported to the store
        self.remote = remote or []  # remote P2P workers (of the stable version)
        self.ever_ready = False

    @property
    def slots(self) -> list[Slot]:
        return [s for v in self.versions.values() for s in v.slots]

    def canary_ready(self) -> bool:
        canary = self.versions.get(self.intent.canary) if self.intent.canary else None
        return canary is not None and canary.ready_everywhere(self.regions)

    def canary_state(self) -> tuple[str, str | None] | None:
        """(starting | ready | failed, reason) of the canary; None without one."""
        if self.intent.canary is None:
            return None
        canary = self.versions.get(self.intent.canary)
        if canary is None:
            return ("starting", None)
        if self.canary_ready():
            return ("ready", None)
        failure = canary.failure()
        if failure is not None:
            return ("failed", f"version {canary.version} gets no traffic: {failure}")
        pending = sum(s.state == "pending" for s in canary.slots)
        if pending:
            return ("starting", f"{pending} worker(s) waiting for room (GPU or CPU) in the cluster")
        return ("starting", None)

    def weights(self) -> tuple[tuple[str, int], ...]:
        return weights(self.intent, self.canary_ready())

    def scaled_to_zero(self) -> bool:
        auto = self.model.autoscaling
        return auto is not None and auto.min_workers == 0 and not any(
            s.state == "ready" for s in self.slots
        ) and not any(r.state == "ready" for r in self.remote)

    def last_decision(self) -> str | None:
        decisions = [
            d for v in self.versions.values() for d in (sc.last for sc in v.scalers.values()) if d is not None
        ]
        if not decisions:
            return None
        last = max(decisions, key=lambda d: d.at)
        return last.describe()

    def routes(self) -> ModelRoutes:
        workers = tuple(r for r in (s.route() for s in self.slots) if r is not None)
        workers += tuple(r.route(self.intent.stable) for r in self.remote)
        return ModelRoutes(
            name=self.model.name,
            kind=self.model.kind,
            workers=workers,
            device="gpu" if self.placement and self.placement.use_gpu else "cpu",
            error=next((s.error for s in self.slots if s.state == "failed" and s.error), None),
            unplaceable=self.placement_error.message if self.placement_error is not None else None,
            replacing=any(
                s.state in ("dead", "pending") or (s.state == "loading" and (s.deaths or self.ever_ready))
                for s in self.slots
            ),
            ever_ready=self.ever_ready,
            weights=self.weights(),
            stable=self.intent.stable,
            scaled_to_zero=self.scaled_to_zero(),
            autoscaler=self.last_decision(),
        )

    def status(self) -> dict[str, Any]:
        slots = self.slots
        ready = sum(s.state == "ready" for s in slots) + sum(r.state == "ready" for r in self.remote)
        if self.placement_error is not None and not ready:
            state, error = "failed", self.placement_error.message
        elif ready or self.scaled_to_zero():
            state, error = "ready", None
        elif any(s.state in ("loading", "dead", "pending") for s in slots):
            state, error = "loading", None  # dead workers are being replaced
        else:
            state = "failed"
            error = next((s.error for s in slots if s.error), "no workers")
        by_state: dict[str, int] = {}
        for s in slots:
            by_state[s.state] = by_state.get(s.state, 0) + 1
        canary = self.canary_state()
        return {
            "state": state,
            "runtime": self.model.runtime,
            "device": "gpu" if self.placement and self.placement.use_gpu else "cpu",
            "workers": len(slots),
            "ready_workers": ready,
            "workers_by_state": by_state,
            "in_flight": sum(s.load for s in slots),
            "regions": sorted({s.region for s in slots} | set(self.regions)),
            "p2p_workers": {r.worker_id: r.state for r in self.remote},
            "versions": {
                v.version: {
                    "workers_by_state": _count(s.state for s in v.slots),
                    "workers_by_region": _count(s.region for s in v.slots),
                    "targets": {"/".join(p): n for p, n in v.targets.items()},
                }
                for v in self.versions.values()
            },
            "weights": dict(self.weights()),
            "canary": None if canary is None else {"version": self.intent.canary, "state": canary[0],
                                                   "reason": canary[1], "weight": self.intent.weight},
            "scaled_to_zero": self.scaled_to_zero(),
            "autoscaler": self.last_decision(),
            "error": error,
        }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


class Orchestrator:
    """Starts or adopts each model's worker actors, watches them, applies rollouts and the
    autoscaler, drains, and publishes the table."""

    def __init__(self, config: HaifConfig, p2p: DeploymentHandle | None = None) -> None:
        context = serve.get_replica_context()
        replica = context.replica_id.unique_id
        tracing.setup_tracing(config.telemetry, "orchestrator", region=config.regions[0].name, instance=replica)
        install_json_logs(config.telemetry, "orchestrator")
        self._config = config
        self._res = config.resilience
        self._namespace = config.ray.namespace
        self._app = context.app_name
        self.leader = getattr(context.rank, "rank", 0) == 0
        self._remote_worker = ray.remote(ModelWorker)
        self._host = TableHost()
        self._p2p = p2p  # the P2P shim: remote P2P workers are probed through it
        self._health_task: asyncio.Task[None] | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._settling: set[asyncio.Task[None]] = set()
        self._draining: dict[str, asyncio.Task[None]] = {}  # slot name -> its drain
        self.replacements = 0
        self.auto_rollbacks = 0
        # What the Gateways report with their long-polls: requests waiting per model, and
        # per version the requests finished and failed (the canary's judge).
        self._queued: dict[str, tuple[float, dict[str, int]]] = {}
        self._judge = CanaryJudge(config.rollouts)
        self._db = _control_store(config)
        self._store_down = False
        self._metrics_target = MetricsTarget.from_config(config)
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        plans = plan_placements(config.models, cluster_gpus, config.total_workers)
        self._fleets: dict[str, ModelFleet] = {}
        for model in config.models:
            if not model.enabled:
                continue
            plan = plans[model.name]
            if not isinstance(plan, Placement):
                logger.error("%s", plan.message)
            elif plan.fell_back_to_cpu:
                logger.warning("model %s asked for a GPU; none free, running on CPU", model.name)
            remote = [RemoteSlot(key.lower(), model, config.model_regions(model)[0].name) for key in model.p2p_workers]
            self._fleets[model.name] = ModelFleet(config, model, plan, remote)
        rows = self._read_rollouts() or {}  # the store down at start: the config's versions
        running = app_workers(self._app, self._namespace)
        for fleet in self._fleets.values():
            fleet.intent = Intent.of(fleet.model, rows.get(fleet.model.name))
            for version in fleet.intent.versions:
                self._version(fleet, version, running)
        if self.leader:
            # Workers no slot wants (an earlier config, a version no longer rolled out) stop.
            wanted = {s.name for f in self._fleets.values() for s in f.slots}
            for name in stop_workers(self._app, self._namespace, keep=wanted):
                logger.warning("stopped worker %s: no slot of this config wants it", name)
        for fleet in self._fleets.values():
            for slot in fleet.slots:
                self._fill(fleet, slot)
        self.metrics = OrchestratorMetrics(ProcessMetrics.start(self._metrics_target, "orchestrator"))
        if self.leader:  # one fleet, counted once (the stand-by replicas see the same workers)
            self.metrics.watch_workers(self._worker_samples)
            self.metrics.watch_rollouts(self._weight_samples)
        self._publish()
        self._ensure_loops()

    def _worker_samples(self) -> list[tuple[str, str, str, int]]:
        """(model, version, state, in flight) of every worker; read from the metrics pusher's thread."""
        return [
            (name, s.version, s.state, s.load) for name, f in list(self._fleets.items()) for s in list(f.slots)
        ]

    def _weight_samples(self) -> list[tuple[str, str, int]]:
        out = []
        for name, fleet in list(self._fleets.items()):
            split = dict(fleet.weights())
            for version in list(fleet.versions):
                out.append((name, version, split.get(version, 0)))
        return out

    # --- the fleet ---------------------------------------------------------------------

    def _version(self, fleet: ModelFleet, version: str, running: list[str]) -> VersionFleet | None:
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
            template = new_slot(self._config, model, region, tier, 0)
            indices = running_indices(running, template)
            if model.autoscaling is not None and indices:
                # A restarted Orchestrator keeps the size the autoscaler had reached.
                auto = model.autoscaling
                vf.targets[(region, tier)] = min(auto.max_workers, max(auto.min_workers, len(indices)))
            for index in indices:
                vf.slots.append(new_slot(self._config, model, region, tier, index))
            if self.leader:
                self._grow(vf, (region, tier))
                # More running than the pool's count (a redeploy with fewer `workers`): drained.
                self._shrink(vf, (region, tier), "more workers run than the config asks for")
        fleet.versions[version] = vf
        return vf

    def _grow(self, vf: VersionFleet, pool: tuple[str, str]) -> list[Slot]:
        """Add slots to ``pool`` up to its target (lowest free indices); the new slots."""
        added = []
        taken = {s.index for s in vf.in_pool(pool)}
        index = 0
        while len(vf.active(pool)) < vf.targets[pool]:
            while index in taken:
                index += 1
            slot = new_slot(self._config, vf.model, pool[0], pool[1], index)
            taken.add(index)
            vf.slots.append(slot)
            added.append(slot)
        return added

    def _shrink(self, vf: VersionFleet, pool: tuple[str, str], reason: str) -> None:
        """Retire ``pool``'s surplus workers: not-ready ones first, then the highest index."""
        active = vf.active(pool)
        surplus = len(active) - vf.targets[pool]
        if surplus <= 0:
            return
        order = sorted(active, key=lambda s: (s.state == "ready", -s.index))
        for slot in order[:surplus]:
            slot.retire, slot.retire_reason = True, reason

    def _fill(self, fleet: ModelFleet, slot: Slot) -> None:
        """Give ``slot`` its actor: the running one of that name (adopted), else, on the
        leader, a new one; then (re)load it (instant on a worker that has the model)."""
        actor = find_worker(slot.name, self._namespace)
        if actor is None:
            if not self.leader:
                slot.state = "pending"  # the leader starts it; adopted at a later round
                return
            actor = self._start(fleet, slot)
        slot.adopt(actor)
        slot.load_ref = actor.load.remote(self._config.limits.object_ref_threshold_bytes)
        self._settle_when_loaded(fleet, slot, slot.load_ref)

    def _start(self, fleet: ModelFleet, slot: Slot) -> Any:
        plan, model = fleet.placement, slot.model
        if plan is None:  # never: a fleet without a placement has no slots
            raise RuntimeError(f"model {model.name!r} has no placement")
        options = plan.actor_options(model.max_concurrency)
        region = next(r for r in self._config.regions if r.name == slot.region)
        if region.resource:
            # A sliver of the region's custom resource pins the worker to that region's nodes.
            options["resources"] = {region.resource: 0.001}
        if plan.needs_placement_group:
            options["scheduling_strategy"] = _tensor_parallel_strategy(plan, f"{slot.name}/pg")
        logger.info("starting worker %s (version %s)", slot.name, slot.version)
        return self._remote_worker.options(
            name=slot.name,
            namespace=self._namespace,
            lifetime="detached",  # it outlives this replica; stop_workers() stops it
            get_if_exists=True,
            **options,
        ).remote(
            model,
            self._config.limits.max_prompt_tokens,
            str(self._config.base_path()),
            f"{model.name}/{slot.where}/{slot.index}",
            self._config.artifacts,
            metrics=self._metrics_target,
            telemetry=self._config.telemetry,
        )

    def _settle_when_loaded(self, fleet: ModelFleet, slot: Slot, load_ref: Any) -> None:
        """Take a worker into the table as soon as its load() returns, not at the next
        health round. (Outside the event loop, at construction, the health loop does it.)"""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def settle() -> None:
            with contextlib.suppress(Exception):  # _refresh() records a failed load
                await load_ref
            self._refresh(fleet)
            self._publish()

        task = loop.create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _refresh(self, fleet: ModelFleet) -> None:
        """Settle finished load() calls without blocking."""
        pending = [s for s in fleet.slots if s.load_ref is not None]
        if not pending:
            return
        done, _ = ray.wait([s.load_ref for s in pending], num_returns=len(pending), timeout=0)
        done_set = set(done)
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
                        stop_worker(slot.name, self._namespace)
                continue
            try:
                ray.get(slot.load_ref)
                slot.state, slot.error, slot.ready_since = "ready", None, time.monotonic()
                fleet.ever_ready = True
            except _ACTOR_GONE as exc:
                slot.mark_dead(type(exc).__name__, self._res.replacement_backoff_max_s)
            except Exception as exc:  # the worker's load failure, recorded and reported
                err = unwrap(exc)
                slot.state = "failed"
                slot.error = err.message if isinstance(err, HaifError) else f"{type(err).__name__}: {err}"
                logger.error("worker %s failed to load: %s", slot.worker_id, slot.error)
            slot.load_ref = None

    async def _mark_unplaced(self) -> None:
        """Workers Ray cannot place yet (no free GPU or CPU) are ``pending``, not loading:
        reported as such, and their load deadline starts once they run."""
        loading = {s.actor_id: s for f in self._fleets.values() for s in f.slots
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

    # --- health ----------------------------------------------------------------------

    def _ensure_loops(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first call starts them
        if self._health_task is None or self._health_task.done():
            self._health_task = loop.create_task(self._health_loop())
        if self._control_task is None or self._control_task.done():
            self._control_task = loop.create_task(self._control_loop())

    async def check_health(self) -> None:
        """Serve's own periodic replica check; also (re)starts the worker health loop."""
        self._ensure_loops()

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._res.health_check_period_s)
            self._wake.clear()
            try:
                await self.probe_workers()
            except Exception:  # one bad round must not stop health checking for good
                logger.exception("worker health check failed")

    async def probe_workers(self) -> None:
        """Settle loads, probe ready workers, replace dead ones whose backoff has passed,
        adopt the leader's new workers, and publish the table."""
        probes = []
        for fleet in self._fleets.values():
            self._refresh(fleet)
            probes += [self._probe(s) for s in fleet.slots if s.state in ("ready", "draining")]
            probes += [self._probe_remote(r) for r in fleet.remote]
        await asyncio.gather(*probes)
        if not self.leader:
            self._follow_leader(await asyncio.to_thread(app_workers, self._app, self._namespace))
        now = time.monotonic()
        for fleet in self._fleets.values():
            for slot in fleet.slots:
                if slot.state == "pending" and slot.actor is None or (slot.state == "dead" and not self.leader):
                    self._fill(fleet, slot)  # adopt what the leader started
                elif slot.state == "dead" and self._res.replace_dead_workers and not slot.retire and (
                    slot.replace_at is not None and slot.replace_at <= now
                ):
                    self.replacements += 1
                    stop_worker(slot.name, self._namespace)  # a hung one: its name is freed
                    self._fill(fleet, slot)
                    logger.warning("replacing dead worker of %s: %s", fleet.model.name, slot.worker_id)
        await self._mark_unplaced()
        self._publish()

    def _follow_leader(self, names: list[str]) -> None:
        """A stand-by's fleet is what runs (``names``): slots for the leader's new workers,
        none for the ones it stopped."""
        running = set(names)
        for fleet in self._fleets.values():
            for vf in fleet.versions.values():
                vf.slots = [s for s in vf.slots if s.name in running or s.state == "ready"]
                for region, tier in vf.pools:
                    template = new_slot(self._config, vf.model, region, tier, 0)
                    have = {s.index for s in vf.in_pool((region, tier))}
                    for index in running_indices(sorted(running), template):
                        if index not in have:
                            vf.slots.append(new_slot(self._config, vf.model, region, tier, index))
            for version, vf in list(fleet.versions.items()):
                if not vf.slots and version not in fleet.intent.versions:
                    del fleet.versions[version]

    async def _probe(self, slot: Slot) -> None:
        actor = slot.actor
        try:
            reply = await asyncio.wait_for(_resolve(actor.ping.remote()), self._res.health_check_timeout_s)
        except TimeoutError:
            if slot.actor is not actor:
                return
            slot.probe_failures += 1
            if slot.probe_failures >= self._res.unhealthy_after_failures:
                if self.leader:
                    ray.kill(actor, no_restart=True)
                slot.mark_dead(f"{slot.probe_failures} health probes timed out", self._res.replacement_backoff_max_s)
            return
        except _ACTOR_GONE as exc:
            if slot.actor is actor and slot.state != "draining":
                slot.mark_dead(type(exc).__name__, self._res.replacement_backoff_max_s)
            return
        # (state, in flight[, loaded adapters]): workers of an earlier release answer two.
        slot.probe_failures, slot.load = 0, reply[1]
        slot.adapters = frozenset(reply[2]) if len(reply) > 2 else frozenset()
        if reply[0] == "draining":  # the leader drains it: a stand-by learns it here
            slot.state = "draining"
        elif reply[0] == "dead" and slot.state != "draining":  # its engine died: replace it
            if self.leader:
                ray.kill(actor, no_restart=True)
            logger.warning("worker %s: its engine died; it is replaced", slot.worker_id)
            slot.mark_dead("its engine died", self._res.replacement_backoff_max_s)

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

    def _publish(self) -> None:
        self._host.publish(RoutingTable.of({name: f.routes() for name, f in self._fleets.items()}))

    # --- the control loop: rollouts, drains, the autoscaler -------------------------------

    def _control_period_s(self) -> float:
        periods = [self._config.rollouts.poll_s]
        periods += [f.model.autoscaling.metrics_interval_s for f in self._fleets.values() if f.model.autoscaling]
        return max(0.05, min(periods))

    async def _control_loop(self) -> None:
        last_poll = float("-inf")
        while True:
            await asyncio.sleep(self._control_period_s())
            try:
                if time.monotonic() - last_poll >= self._config.rollouts.poll_s:
                    last_poll = time.monotonic()
                    await self._poll_store()
                # Every replica judges the canaries on the reports it gets (a Gateway's
                # long-poll reaches any replica); the store's generation guard lets the first
                # verdict through, and the leader drains the canary when it reads the row.
                await self._judge_canaries()
                if self.leader:
                    self._autoscale()
                    self._advance_drains()
                    self._start_new_slots()
                self._publish()
            except Exception:  # one bad round must not stop the control plane for good
                logger.exception("control round failed")

    def _read_rollouts(self) -> dict[str, Any] | None:
        """Every rollout row; None when the store does not answer (the rollouts applied stay:
        an outage must not look like "no rollout" and undo them)."""
        if self._db is None:
            return {}
        from haif.store.rollouts import read_rollouts

        try:
            with self._db.connect() as conn:
                rows = read_rollouts(conn)
        except Exception as exc:
            if not self._store_down:  # one line per outage, not one per poll
                logger.warning("rollouts: the metadata store did not answer (%s); the rollouts "
                               "applied stay as they are", type(exc).__name__)
            self._store_down = True
            return None
        if self._store_down:
            logger.info("rollouts: the metadata store answers again")
        self._store_down = False
        return rows

    async def _poll_store(self) -> None:
        """Apply the operator's rollouts and drain requests (one read each per poll)."""
        if self._db is None:
            return
        rows = await asyncio.to_thread(self._read_rollouts)
        if rows is None:
            return
        running: list[str] | None = None  # listed once, and only when a rollout changed
        for fleet in self._fleets.values():
            intent = Intent.of(fleet.model, rows.get(fleet.model.name))
            if intent != fleet.intent:
                if running is None:
                    running = await asyncio.to_thread(app_workers, self._app, self._namespace)
                self._apply(fleet, intent, running)
            if self.leader:
                await self._report_canary(fleet)
        if self.leader:
            await self._take_drain_requests()

    def _apply(self, fleet: ModelFleet, intent: Intent, running: list[str]) -> None:
        """Make ``intent`` the fleet's: start the versions it wants, drain the others."""
        before = fleet.intent
        fleet.intent = intent
        logger.info(
            "rollout of %s: stable %s, canary %s at %d%% (was stable %s, canary %s at %d%%)",
            fleet.model.name, intent.stable, intent.canary, intent.weight,
            before.stable, before.canary, before.weight,
        )
        for version in intent.versions:
            vf = self._version(fleet, version, running)
            if vf is not None and self.leader:
                for slot in vf.slots:
                    if slot.actor is None and slot.state == "pending":
                        self._fill(fleet, slot)
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
            self._judge.forget(fleet.model.name, version)

    async def _report_canary(self, fleet: ModelFleet) -> None:
        state = fleet.canary_state()
        if state is None or state == fleet.canary_status or not fleet.intent.generation:
            return
        from haif.store.rollouts import report_canary

        def write() -> bool:
            with self._db.begin() as conn:  # type: ignore[union-attr]
                return report_canary(conn, fleet.model.name, fleet.intent.generation, state[0], state[1])

        try:
            await asyncio.to_thread(write)
            fleet.canary_status = state
        except Exception as exc:
            logger.warning("rollouts: cannot record the canary's state (%s)", type(exc).__name__)

    async def _take_drain_requests(self) -> None:
        """``haif workers drain WORKER_ID``: a replacement starts in the worker's pool, and
        the worker drains once the pool has another ready worker."""
        from haif.store.rollouts import finish_drain, pending_drains

        def pending() -> list[str]:
            with self._db.connect() as conn:  # type: ignore[union-attr]
                return pending_drains(conn)

        def finish(worker_id: str, outcome: str) -> None:
            with self._db.begin() as conn:  # type: ignore[union-attr]
                finish_drain(conn, worker_id, outcome)

        try:
            asked = await asyncio.to_thread(pending)
        except Exception:
            return
        for worker_id in asked:
            slot, vf = self._find_slot(worker_id)
            if slot is None or vf is None:
                outcome = f"no worker {worker_id!r} in this deployment"
            elif slot.retire or slot.state == "draining":
                outcome = "already draining"
            else:
                slot.retire, slot.retire_reason = True, "drained by the operator"
                for new in self._grow(vf, slot.pool):
                    self._fill(self._fleets[vf.model.name], new)
                outcome = "draining: it stops once its replacement is ready and its requests are done"
            logger.info("drain of worker %s: %s", worker_id, outcome)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(finish, worker_id, outcome)

    def _find_slot(self, worker_id: str) -> tuple[Slot | None, VersionFleet | None]:
        for fleet in self._fleets.values():
            for vf in fleet.versions.values():
                for slot in vf.slots:
                    if worker_id in (slot.worker_id, slot.name):
                        return slot, vf
        return None, None

    def _ongoing(self, fleet: ModelFleet, vf: VersionFleet, pool: tuple[str, str]) -> float:
        """Requests the pool is asked to carry: running on its workers, plus (in the model's
        first pool of its stable version) the ones waiting in the Gateways' queues."""
        ongoing = float(vf.load(pool))
        if vf.version == fleet.intent.stable and pool == fleet.pools[0]:
            horizon = time.monotonic() - 3 * self._res.routing_table_refresh_s - 1.0
            ongoing += sum(
                q.get(fleet.model.name, 0) for at, q in self._queued.values() if at >= horizon
            )
        return ongoing

    def _autoscale(self) -> None:
        now, wall = time.monotonic(), time.time()
        for fleet in self._fleets.values():
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
                    self.metrics.autoscaled(fleet.model.name, direction)
                    logger.info(
                        "autoscale %s version %s in %s: %s", fleet.model.name, vf.version, "/".join(pool),
                        decision.describe() if decision else f"{current}→{wanted}",
                        extra={"event": "autoscale", "model": fleet.model.name, "version": vf.version,
                               "direction": direction, "workers": wanted},
                    )
                    if wanted > current:
                        for slot in self._grow(vf, pool):
                            self._fill(fleet, slot)
                    else:
                        self._shrink(vf, pool, f"scaled down to {wanted}")

    def _start_new_slots(self) -> None:
        """Pools below their count (a worker retired by the operator, a new version) grow."""
        for fleet in self._fleets.values():
            for vf in fleet.versions.values():
                if vf.version not in fleet.intent.versions or vf.error is not None:
                    continue
                for pool in vf.pools:
                    for slot in self._grow(vf, pool):
                        self._fill(fleet, slot)

    async def _judge_canaries(self) -> None:
        for fleet in self._fleets.values():
            canary = fleet.intent.canary
            if canary is None or self._db is None:
                continue
            reason = self._judge.verdict(fleet.model.name, canary)
            if reason is None:
                continue
            self._judge.forget(fleet.model.name, canary)
            # Written before it is applied: the next poll must not read the canary back.
            if not await self._rollback_in_store(fleet, reason):
                continue  # another replica's verdict, or the operator's change, came first
            self.auto_rollbacks += 1
            self.metrics.rolled_back(fleet.model.name, canary)
            logger.warning(
                "rollout of %s: canary %s %s", fleet.model.name, canary, reason,
                extra={"event": "rollout_auto_rollback", "model": fleet.model.name, "version": canary},
            )
            self._apply(fleet, Intent(stable=fleet.intent.stable), [])

    async def _rollback_in_store(self, fleet: ModelFleet, reason: str) -> bool:
        """Record the automatic rollback, unless the rollout changed since the canary was
        judged (its generation moved on: that change wins). Whether it was recorded."""
        from haif.store.rollouts import RolloutRepository

        model, version, generation = fleet.model.name, fleet.model.version, fleet.intent.generation

        def write() -> bool:
            try:
                with self._db.session() as session:  # type: ignore[union-attr]
                    RolloutRepository(session).rollback(
                        model, version, reason=reason, automatic=True, generation=generation
                    )
                return True
            except HaifError as exc:
                logger.info("rollout of %s: automatic rollback not recorded: %s", model, exc.message)
                return False

        return await asyncio.to_thread(write)

    def _advance_drains(self) -> None:
        """Retired workers drain once their pool has another ready worker (or needs none);
        drained ones stop; versions left with no worker go."""
        for fleet in self._fleets.values():
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
        self._publish()  # the Gateways stop sending it requests now
        logger.info("draining worker %s: %s", slot.worker_id, slot.retire_reason or "retired")

        async def drain() -> None:
            left = 0
            try:
                if slot.actor is not None and was in ("ready", "loading", "draining"):
                    left = await asyncio.wait_for(
                        _resolve(slot.actor.drain.remote(timeout_s)), timeout_s + self._res.health_check_timeout_s
                    )
                    # Idle; it goes on refusing (the Gateway sends those requests elsewhere)
                    # until every Gateway has a table without it, then it stops.
                    await asyncio.sleep(self._drain_grace_s())
                    left = await asyncio.wait_for(
                        _resolve(slot.actor.drain.remote(0.0)), self._res.health_check_timeout_s
                    ) or left
            except Exception as exc:  # gone already, or hung: it is stopped all the same
                logger.info("drain of %s ended: %s", slot.worker_id, type(exc).__name__)
            if left:
                logger.warning(
                    "worker %s stopped with %d request(s) still running after drain_timeout_s=%g",
                    slot.worker_id, left, timeout_s,
                )
            stop_worker(slot.name, self._namespace)
            if slot in vf.slots:
                vf.slots.remove(slot)
            self._draining.pop(slot.name, None)
            logger.info("worker %s drained and stopped", slot.worker_id)
            self._publish()

        self._draining[slot.name] = asyncio.get_running_loop().create_task(drain())

    def _drain_grace_s(self) -> float:
        """How long a drained, idle worker keeps refusing before it stops: long enough for
        every Gateway to hold a table that no longer routes to it: a stand-by replica learns
        of a drain from the worker's next probe (a rollout's, within a store poll), and a
        Gateway's long-poll answers within a refresh."""
        res = self._res
        return (
            2 * res.routing_table_refresh_s + max(res.health_check_period_s, self._config.rollouts.poll_s)
            + 0.5
        )

    # --- what the Gateways call --------------------------------------------------------

    async def listen(
        self, version: str | None, timeout_s: float = 1.0, report: dict[str, Any] | None = None
    ) -> RoutingTable:
        """The routing table as soon as it differs from ``version``, else after
        ``timeout_s`` (with the workers' latest load figures): a Gateway's long-poll.

        ``report``: the Gateway's figures since its last poll: ``{"gateway": id, "queued":
        {model: n}, "outcomes": {model: {version: [finished, platform errors]}}}``.
        """
        self._ensure_loops()
        if report:
            self._take_report(report)
        return await self._host.listen(version, min(max(timeout_s, 0.0), MAX_LISTEN_S))

    def _take_report(self, report: dict[str, Any]) -> None:
        gateway = str(report.get("gateway") or "?")
        self._queued[gateway] = (time.monotonic(), dict(report.get("queued") or {}))
        for model, versions in (report.get("outcomes") or {}).items():
            fleet = self._fleets.get(model)
            canary = fleet.intent.canary if fleet is not None else None
            figures = versions.get(canary) if canary is not None else None
            if figures is None:  # only a canary is judged (a version rolled back is not)
                continue
            finished, errors = int(figures[0]), int(figures[1])
            self._judge.add(model, canary, finished, errors)
            if errors:
                seen, failed = self._judge.rate(model, canary)
                logger.info(
                    "canary %s:%s: %d of %d requests failed on the platform's side in the last %g s",
                    model, canary, failed, seen, self._config.rollouts.window_s,
                )

    def demand(self, model: str) -> None:
        """A Gateway holds requests for ``model``, which has no worker (scaled to zero):
        start one now, not at the next autoscaler round."""
        fleet = self._fleets.get(model)
        if fleet is None or not self.leader:
            return
        vf = fleet.versions.get(fleet.intent.stable)
        if vf is None or not vf.scalers:
            return
        pool = fleet.pools[0]
        if vf.targets[pool] == 0:
            scaler = vf.scalers[pool]
            vf.targets[pool] = scaler.decide(time.monotonic(), 0, 1.0, time.time())
            self.metrics.autoscaled(model, "up")
            logger.info("autoscale %s: a request waits and no worker runs; starting one", model,
                        extra={"event": "autoscale", "model": model, "direction": "up", "workers": vf.targets[pool]})
            for slot in self._grow(vf, pool):
                self._fill(fleet, slot)
            self._publish()

    def worker_died(self, worker_id: str) -> None:
        """A Gateway saw ``worker_id`` die under a request: probe it now (its health round
        confirms the death and replaces it)."""
        logger.warning("a Gateway reports worker %s dead", worker_id)
        self._wake.set()

    # --- introspection ------------------------------------------------------------------

    def models(self) -> list[str]:
        return list(self._fleets)

    def status(self) -> dict[str, Any]:
        self._ensure_loops()
        models = {name: fleet.status() for name, fleet in self._fleets.items()}
        return {
            "ready": all(m["state"] == "ready" for m in models.values()),
            "models": models,
            "leader": self.leader,
            "replacements": self.replacements,
            "auto_rollbacks": self.auto_rollbacks,
            "table_version": self._host.table.version,
        }

    async def workers_info(self, model: str | None = None) -> list[dict[str, Any]]:
        """Each live worker's own report (placement, GPU ids, load) and its region; dead ones,
        and ones that do not answer within the health-check timeout, are skipped."""
        slots = [
            s for name, f in self._fleets.items() if model in (None, name) for s in f.slots
            if s.actor is not None
        ]
        # Bounded: a replacement waiting for its region's node to come back never answers.
        timeout = self._res.health_check_timeout_s
        infos = await asyncio.gather(
            *(asyncio.wait_for(_resolve(s.actor.info.remote()), timeout) for s in slots),
            return_exceptions=True,
        )
        return [
            {**info, "worker_id": slot.worker_id, "name": slot.name, "region": slot.region,
             "tier": slot.tier, "version": slot.version, "state": slot.state,
             "routed": slot.state == "ready"}
            for slot, info in zip(slots, infos, strict=True)
            if isinstance(info, dict)
        ]

    async def __del__(self) -> None:
        """Serve stops this replica. When the application itself is going (``serve
        shutdown``, ``serve.delete``), its workers go too: none is left holding a GPU. A
        replica stopped while the app stays (a redeploy, a downscale) leaves them."""
        if not self.leader or not _app_deleting(self._app):
            return
        stopped = stop_workers(self._app, self._namespace)
        logger.info("application %s is deleted: stopped %d worker(s)", self._app, len(stopped))


def _control_store(config: HaifConfig) -> Any:
    """The metadata store the rollouts and drain requests are read from (None: none)."""
    try:
        from haif.store.db import Database

        return Database.from_config(config, pool_size=1)
    except Exception as exc:  # no store: the config's versions alone, no rollouts
        logger.warning("rollouts: no metadata store (%s); serving the config's versions", exc)
        return None


def _app_deleting(app: str) -> bool:
    """Whether Serve is deleting ``app`` (or shutting down: then it cannot tell)."""
    try:
        status = serve.status().applications.get(app)
    except Exception:  # the controller is going away: Serve itself shuts down
        return True
    return status is None or str(status.status).endswith("DELETING")


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


async def _resolve(ref: Any) -> Any:
    return await ref
