"""The Orchestrator: HAIF's control plane, a Ray Serve deployment off the request path.

It owns the worker fleet: places each model's workers (GPU pinning, CPU fallback,
tensor-parallel placement groups, regions and tiers), probes their health, replaces dead
ones with backoff, applies the operator's rollouts, the canary's judge, the autoscaler
and the drains, and publishes the routing table (``haif.orchestrator.table``) that every
Gateway replica holds and routes with. No request passes through it: a Gateway calls
the workers itself.

However many replicas run, there is one fleet. Workers are named actors, so every
replica sees the same ones; the replica of rank 0 leads: it alone starts, replaces and
stops workers, while the others adopt what it started and publish the same table (any
replica answers a Gateway's long-poll). A replica that dies leaves the workers running;
the replica Serve starts in its place adopts them.

This class is thin, as Ray Serve's controller is over its state managers: it gets its
collaborators (``OrchestratorParts``, built by ``haif.orchestrator.compose``; the layers
are drawn in ``haif.orchestrator``), runs one control loop over them, and answers the
Gateways and the operator's tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ray import serve

from haif.orchestrator.compose import compose
from haif.orchestrator.fleet import resolve

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig
    from haif.orchestrator.compose import OrchestratorParts
    from haif.orchestrator.table import RoutingTable

logger = logging.getLogger("haif.orchestrator")

# A Gateway's long-poll is answered within this, whatever it asks for.
MAX_LISTEN_S = 60.0


class Orchestrator:
    """A replica of the control plane: one loop over the fleet's health and the control
    policies, and the methods the Gateways and the operator's tools call.

    Args:
        config: HAIF's config (prepared).
        p2p: the P2P shim's handle (remote P2P workers are probed through it), if it runs.
        parts: the collaborators, when a test builds them; else ``compose`` builds them
            (and sets up the replica's tracing and logs).
    """

    def __init__(
        self,
        config: HaifConfig,
        p2p: DeploymentHandle | None = None,
        *,
        parts: OrchestratorParts | None = None,
    ) -> None:
        self._config = config
        self._parts = parts if parts is not None else compose(config, p2p)
        self._fleet = self._parts.fleet
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._fleet.publish()
        self._ensure_loop()

    @property
    def leader(self) -> bool:
        return self._fleet.leader

    # --- the control loop ----------------------------------------------------------------

    def _ensure_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first call starts it
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())

    async def check_health(self) -> None:
        """Serve's own periodic replica check; also (re)starts the control loop."""
        self._ensure_loop()

    def _control_period_s(self) -> float:
        periods = [self._config.rollouts.poll_s, self._config.auth.change_poll_s]
        autoscale_s = self._parts.autoscaler.period_s()
        if autoscale_s is not None:
            periods.append(autoscale_s)
        return max(0.05, min(periods))

    async def _run(self) -> None:
        """One loop, two cadences: a health round every ``health_check_period_s`` (at once
        when a Gateway reports a worker dead), a control round every ``rollouts.poll_s``,
        ``auth.change_poll_s`` (the auth epoch) and autoscaler's ``metrics_interval_s``. The
        loop only schedules: each round runs as a task of its own, so a slow one (a hung
        worker's probe, a store read during an outage) never delays the other kind; a kind
        never overlaps itself. A round that fails is logged; the next runs."""
        health_s, control_s = self._config.resilience.health_check_period_s, self._control_period_s()
        next_health, next_control = time.monotonic() + health_s, time.monotonic() + control_s
        last_poll = float("-inf")
        health: asyncio.Task[None] | None = None
        control: asyncio.Task[None] | None = None
        while True:
            now = time.monotonic()
            if self._wake.is_set():
                self._wake.clear()
                next_health = now
            if now >= next_health and _idle(health):
                health = asyncio.create_task(_logged(self.probe_workers(), "worker health check failed"))
                next_health = now + health_s
            if now >= next_control and _idle(control):
                poll = now - last_poll >= self._config.rollouts.poll_s
                if poll:
                    last_poll = now
                control = asyncio.create_task(_logged(self._control_round(poll), "control round failed"))
                next_control = now + control_s
            # Sleep until a wake, a round's end, or the next round due of a kind not running.
            due = [at for at, task in ((next_health, health), (next_control, control)) if _idle(task)]
            running = [task for task in (health, control) if not _idle(task)]
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait(
                    [waker, *running],
                    timeout=max(0.0, min(due) - time.monotonic()) if due else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waker.cancel()

    async def probe_workers(self) -> None:
        """One health round (``HealthMonitor.probe_workers``)."""
        await self._parts.health.probe_workers()

    async def _control_round(self, poll: bool) -> None:
        parts, leader = self._parts, self._fleet.leader
        await self._read_auth_epoch()
        if poll and await parts.rollouts.poll() and leader:
            await parts.drains.take_requests()
        # Every replica judges the canaries on the reports it gets (a Gateway's long-poll
        # reaches any replica); the store's generation guard lets the first verdict
        # through, and the leader drains the canary when it reads the row.
        await parts.canary.judge()
        if leader:
            parts.autoscaler.scale()
            parts.drains.advance()
            parts.fleet.fill_pools()
        parts.fleet.publish()

    # --- what the Gateways call --------------------------------------------------------

    async def listen(
        self, version: str | None, timeout_s: float = 1.0, report: dict[str, Any] | None = None
    ) -> RoutingTable:
        """The routing table as soon as it differs from ``version``, else after
        ``timeout_s`` (with the workers' latest load figures): a Gateway's long-poll.

        ``report``: the Gateway's figures since its last poll: ``{"gateway": id, "queued":
        {model: n}, "outcomes": {model: {version: [finished, platform errors]}}}``.
        """
        self._ensure_loop()
        if report:
            gateway = str(report.get("gateway") or "?")
            self._parts.autoscaler.take_queued(gateway, dict(report.get("queued") or {}))
            self._parts.canary.take_outcomes(report.get("outcomes") or {})
        return await self._fleet.host.listen(version, min(max(timeout_s, 0.0), MAX_LISTEN_S))

    async def auth_changed(self) -> int:
        """A Gateway changed what authenticates (a revocation, a suspension): publish the
        new auth epoch now, not at the next control round. Answers the epoch published."""
        await self._read_auth_epoch()
        return self._fleet.auth_epoch

    async def _read_auth_epoch(self) -> None:
        store = self._parts.store
        epoch = await asyncio.to_thread(store.read_auth_epoch) if store is not None else None
        if epoch is not None and self._fleet.observe_auth_epoch(epoch):
            self._fleet.publish()

    def demand(self, model: str) -> None:
        """A Gateway holds requests for ``model``, which has no worker (scaled to zero):
        start one now, not at the next autoscaler round."""
        self._parts.autoscaler.demand(model)

    def worker_died(self, worker_id: str) -> None:
        """A Gateway saw ``worker_id`` die under a request: probe it now (its health round
        confirms the death and replaces it)."""
        logger.warning("a Gateway reports worker %s dead", worker_id)
        self._wake.set()

    # --- introspection ------------------------------------------------------------------

    def models(self) -> list[str]:
        return list(self._fleet.fleets)

    def status(self) -> dict[str, Any]:
        self._ensure_loop()
        models = {name: fleet.status() for name, fleet in self._fleet.fleets.items()}
        return {
            "ready": all(m["state"] == "ready" for m in models.values()),
            "models": models,
            "leader": self._fleet.leader,
            "replacements": self._parts.health.replacements,
            "auto_rollbacks": self._parts.canary.auto_rollbacks,
            "table_version": self._fleet.host.table.version,
        }

    async def workers_info(self, model: str | None = None) -> list[dict[str, Any]]:
        """Each live worker's own report (placement, GPU ids, load) and its region; dead ones,
        and ones that do not answer within the health-check timeout, are skipped."""
        slots = [
            s for name, f in self._fleet.fleets.items() if model in (None, name) for s in f.slots
            if s.actor is not None
        ]
        # Bounded: a replacement waiting for its region's node to come back never answers.
        timeout = self._config.resilience.health_check_timeout_s
        infos = await asyncio.gather(
            *(asyncio.wait_for(resolve(s.actor.info.remote()), timeout) for s in slots),
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
        if not self._fleet.leader or not _app_deleting(self._fleet.app):
            return
        stopped = self._fleet.stop_all()
        logger.info("application %s is deleted: stopped %d worker(s)", self._fleet.app, len(stopped))


def _idle(task: asyncio.Task[None] | None) -> bool:
    return task is None or task.done()


async def _logged(round_: Any, what: str) -> None:
    """Run one round; a failure is logged (one bad round must not stop the loop for good)."""
    try:
        await round_
    except Exception:
        logger.exception(what)


def _app_deleting(app: str) -> bool:
    """Whether Serve is deleting ``app`` (or shutting down: then it cannot tell)."""
    try:
        status = serve.status().applications.get(app)
    except Exception:  # the controller is going away: Serve itself shuts down
        return True
    return status is None or str(status.status).endswith("DELETING")
