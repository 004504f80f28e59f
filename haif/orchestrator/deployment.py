"""The Orchestrator: a Ray Serve deployment that owns the worker actors and routes to them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.worker import ModelWorker
from haif.envelope import Dispatched
from haif.exceptions import (
    DeadlineExceeded,
    HaifError,
    InternalError,
    ModelNotFound,
    ModelNotReady,
    RetryableError,
    UnprocessableRequest,
    WorkerUnavailable,
    unwrap,
)
from haif.orchestrator.breaker import Backoff
from haif.orchestrator.placement import Placement, plan_placements
from haif.orchestrator.pool import SHARED_TIER, ModelPool, Route, WorkerSlot, new_breaker
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs
from haif.telemetry.metrics import MetricsTarget, OrchestratorMetrics, ProcessMetrics

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.envelope import WorkItem
    from haif.runtimes.base import StreamEvent

logger = logging.getLogger("haif.orchestrator")

_ACTOR_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class Orchestrator:
    """Creates each model's worker actors, watches their health and routes requests.

    Workers are owned by this replica (not detached): if the replica dies, Ray tears
    its workers down with it and the replica Serve starts in its place creates new ones.
    A worker that dies (or stops answering probes) is replaced; a request whose worker
    fails is retried on another one when that is safe (see ``_failure``).
    """

    def __init__(self, config: HaifConfig) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        tracing.setup_tracing(config.telemetry, "orchestrator", region=config.regions[0].name, instance=replica)
        install_json_logs(config.telemetry, "orchestrator")
        self._config = config
        self._res = config.resilience
        self._backoff = Backoff(
            self._res.retry_backoff_initial_ms / 1000, self._res.retry_backoff_max_ms / 1000
        )
        self._pools: dict[str, ModelPool] = {}
        self._remote_worker = ray.remote(ModelWorker)
        self._replica = replica
        self._health_task: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()  # replacement loads being awaited
        self.retries = 0
        self.replacements = 0
        self._metrics_target = MetricsTarget.from_config(config)
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        plans = plan_placements(config.models, cluster_gpus, config.total_workers)
        for model in config.models:
            if not model.enabled:
                continue
            plan = plans[model.name]
            retry_after = self._res.overloaded_retry_after_s
            if not isinstance(plan, Placement):
                logger.error("%s", plan.message)
                self._pools[model.name] = ModelPool(
                    model, None, placement_error=plan, overloaded_retry_after_s=retry_after
                )
                continue
            if plan.fell_back_to_cpu:
                logger.warning("model %s asked for a GPU; none free, running on CPU", model.name)
            pool = ModelPool(model, plan, overloaded_retry_after_s=retry_after)
            for region in config.model_regions(model):
                for tier in [SHARED_TIER, *model.dedicated_tenants]:
                    for i in range(model.workers):
                        where = region.name if tier == SHARED_TIER else f"{region.name}/{tier}"
                        slot = WorkerSlot(
                            worker_id=f"{model.name}/{where}/{self._replica}/{i}",
                            actor=None,
                            load_ref=None,
                            breaker=new_breaker(self._res),
                            region=region.name,
                            tier=tier,
                            capacity=model.max_concurrency,
                        )
                        self._spawn(pool, slot)
                        pool.slots.append(slot)
            self._pools[model.name] = pool
        # Metrics: workers by state and in flight are sampled; queue depth and circuit
        # states are set by each health round.
        self.metrics = OrchestratorMetrics(ProcessMetrics.start(self._metrics_target, "orchestrator"))
        self.metrics.watch_workers(self._worker_samples)
        self._ensure_health_loop()

    def _worker_samples(self) -> list[tuple[str, str, int]]:
        """(model, state, in flight) of every worker; read from the metrics pusher's thread."""
        return [(name, s.state, s.in_flight) for name, pool in list(self._pools.items())
                for s in list(pool.slots)]

    def _spawn(self, pool: ModelPool, slot: WorkerSlot) -> None:
        """Start the actor of ``slot`` (a new one, or a replacement) and its load."""
        plan, model = pool.placement, pool.model
        if plan is None:
            raise InternalError(f"model {model.name!r} has no placement; it has no workers to start")
        options = plan.actor_options(model.max_concurrency)
        region = next(r for r in self._config.regions if r.name == slot.region)
        if region.resource:
            # A sliver of the region's custom resource pins the worker to that region's nodes.
            options["resources"] = {region.resource: 0.001}
        if plan.needs_placement_group:
            options["scheduling_strategy"] = _tensor_parallel_strategy(plan)
        if slot.generation:
            self.metrics.forget_worker(model.name, slot.worker_id)
            base = slot.worker_id.split("#", 1)[0]
            slot.worker_id = f"{base}#{slot.generation}"
        slot.actor = self._remote_worker.options(**options).remote(
            model,
            self._config.limits.max_prompt_tokens,
            str(self._config.base_path()),
            slot.worker_id,
            self._config.artifacts,
            metrics=self._metrics_target,
            telemetry=self._config.telemetry,
        )
        slot.load_ref = slot.actor.load.remote(self._config.limits.object_ref_threshold_bytes)
        slot.state, slot.load_started, slot.probe_failures = "loading", time.monotonic(), 0
        slot.breaker = new_breaker(self._res)
        self._settle_when_loaded(pool, slot.load_ref)

    def _settle_when_loaded(self, pool: ModelPool, load_ref: Any) -> None:
        """Take a worker into routing as soon as its load() returns, not at the next health
        round: a replacement serves the moment it is ready. (Workers started while the
        replica is constructed, outside the event loop, are settled by the health loop.)"""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def settle() -> None:
            with contextlib.suppress(Exception):  # refresh() records a failed load
                await load_ref
            pool.refresh()

        task = loop.create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    # --- health ----------------------------------------------------------------------

    def _ensure_health_loop(self) -> None:
        if self._health_task is not None and not self._health_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first call starts it
        self._health_task = loop.create_task(self._health_loop())

    async def check_health(self) -> None:
        """Serve's own periodic replica check; also (re)starts the worker health loop."""
        self._ensure_health_loop()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._res.health_check_period_s)
            try:
                await self.probe_workers()
            except Exception:  # one bad round must not stop health checking for good
                logger.exception("worker health check failed")

    async def probe_workers(self) -> None:
        """Settle loads, probe ready workers, replace dead ones whose backoff has passed."""
        probes = []
        for pool in self._pools.values():
            pool.refresh()
            probes += [self._probe(pool, s) for s in pool.slots if s.state == "ready"]
        await asyncio.gather(*probes)
        self._record_states()
        if not self._res.replace_dead_workers:
            return
        now = time.monotonic()
        for pool in self._pools.values():
            for slot in pool.slots:
                if slot.state == "dead" and slot.replace_at is not None and slot.replace_at <= now:
                    slot.generation += 1
                    self.replacements += 1
                    self._spawn(pool, slot)
                    logger.warning("replacing dead worker of %s: %s", pool.model.name, slot.worker_id)

    async def _probe(self, pool: ModelPool, slot: WorkerSlot) -> None:
        actor = slot.actor
        try:
            await asyncio.wait_for(_resolve(actor.ping.remote()), self._res.health_check_timeout_s)
        except TimeoutError:
            if slot.actor is not actor:
                return
            slot.probe_failures += 1
            slot.breaker.failure()
            if slot.probe_failures >= self._res.unhealthy_after_failures:
                ray.kill(actor)
                self._dead(pool, slot, f"{slot.probe_failures} health probes timed out")
            return
        except _ACTOR_GONE as exc:
            if slot.actor is actor:
                self._dead(pool, slot, type(exc).__name__)
            return
        slot.probe_failures = 0

    def _record_states(self) -> None:
        for name, pool in self._pools.items():
            self.metrics.queue_depth(name, pool.queued)
            for slot in pool.slots:
                self.metrics.circuit_state(name, slot.worker_id, int(slot.breaker.state))

    def _dead(self, pool: ModelPool, slot: WorkerSlot, reason: str) -> None:
        pool.mark_dead(slot, reason, self._res.replacement_backoff_max_s)

    # --- introspection ------------------------------------------------------------------

    def models(self) -> list[str]:
        self._ensure_health_loop()
        return list(self._pools)

    def status(self) -> dict[str, Any]:
        self._ensure_health_loop()
        models = {name: pool.status() for name, pool in self._pools.items()}
        ready = all(m["state"] == "ready" for m in models.values())
        return {
            "ready": ready,
            "models": models,
            "retries": self.retries,
            "replacements": self.replacements,
        }

    async def workers_info(self, model: str | None = None) -> list[dict[str, Any]]:
        """Each live worker's own report (placement, GPU ids, load) and its region; dead ones,
        and ones that do not answer within the health-check timeout, are skipped.

        ``state`` is the worker's own; ``routed`` says whether this Orchestrator sends it
        requests now (its load settled here and its circuit breaker allows calls)."""
        slots = [s for name, p in self._pools.items() if model in (None, name) for s in p.slots]
        # Bounded: a replacement waiting for its region's node to come back never answers.
        timeout = self._res.health_check_timeout_s
        infos = await asyncio.gather(
            *(asyncio.wait_for(_resolve(s.actor.info.remote()), timeout) for s in slots),
            return_exceptions=True,
        )
        return [
            {**info, "region": slot.region, "tier": slot.tier, "assigned": slot.in_flight,
             "breaker": slot.breaker.state.name.lower(), "routed": slot.live()}
            for slot, info in zip(slots, infos, strict=True)
            if isinstance(info, dict)
        ]

    # --- serving ----------------------------------------------------------------------

    def _pool(self, item: WorkItem, kind: str) -> ModelPool:
        self._ensure_health_loop()
        pool = self._pools.get(item.model)
        if pool is None:
            raise ModelNotFound(f"the model {item.model!r} does not exist")
        if pool.model.kind != kind:
            use = "/v1/embeddings" if pool.model.kind == "embed" else "/v1/completions or /v1/chat/completions"
            raise UnprocessableRequest(f"model {item.model!r} does not support this endpoint; use {use}")
        return pool

    def _route(self, item: WorkItem, pool: ModelPool) -> Route:
        principal = item.ctx.principal
        tenant = principal.tenant if principal is not None else None
        tier = tenant if tenant is not None and tenant in pool.model.dedicated_tenants else SHARED_TIER
        return Route(tier=tier, regions=(self._config.home_region(tenant),))

    async def _attempt_failed(
        self, pool: ModelPool, slot: WorkerSlot, actor: Any, exc: Exception, item: WorkItem, sent: float,
        attempts: int,
    ) -> None:
        """Raise the typed error of a failed attempt when it is final; else back off."""
        err, retry = self._failure(pool, slot, actor, exc, item, sent)
        if not retry:
            err.attempts = attempts  # type: ignore[attr-defined]
            raise err
        await self._back_off(err, attempts, item, slot.worker_id)

    async def _back_off(
        self, err: HaifError, attempts: int, item: WorkItem, worker: str | None = None
    ) -> None:
        """Sleep before another try, or raise ``err`` when the tries or the deadline are spent.

        The error carries ``attempts``, which the Gateway writes into the job record; each
        retry is an event on the route span.
        """
        err.attempts = attempts  # type: ignore[attr-defined]
        delay = self._backoff.delay(attempts)
        if attempts >= self._res.max_attempts or delay >= item.ctx.deadline - time.time():
            raise err  # no tries or no time left: the client gets the typed error now
        self.retries += 1
        event = {"haif.attempt": attempts, "haif.reason": err.code, "haif.backoff_ms": round(delay * 1000, 1)}
        if worker is not None:
            event[tracing.WORKER] = worker
        tracing.add_event("retry", event)
        logger.warning(
            "request %s: attempt %d on %s failed (%s); retrying in %.0f ms",
            item.ctx.request_id, attempts, worker or item.model, err.code, delay * 1000,
        )
        await asyncio.sleep(delay)

    def _failure(
        self, pool: ModelPool, slot: WorkerSlot, actor: Any, exc: Exception, item: WorkItem, sent: float
    ) -> tuple[HaifError, bool]:
        """The typed error of a failed attempt, and whether another attempt is safe.

        Retried: errors the worker raised before doing any work (not ready, overloaded,
        unavailable), and a dead worker when this Orchestrator knew it was dead before the
        request was sent. A request that may already have run on a worker that died or
        failed unexpectedly is retried only when it carries an idempotency key.

        ``actor`` is the worker the attempt went to. When the slot holds another one by now
        (the first died and was replaced while this request was failing), the failure says
        nothing about the replacement: its breaker and state are left alone.
        """
        idempotent = item.ctx.idempotency_key is not None
        current = slot.actor is actor

        def breaker_says(worker_ok: bool) -> None:
            if not current:
                return
            if worker_ok:
                slot.breaker.success()
            else:
                slot.breaker.failure()

        if isinstance(exc, _ACTOR_GONE):
            known_dead_before = slot.died_at is not None and slot.died_at < sent
            if current:
                self._dead(pool, slot, type(exc).__name__)
            return WorkerUnavailable(
                f"the worker serving {item.model!r} died; retry (send an Idempotency-Key to let HAIF retry)"
            ), idempotent or known_dead_before
        cause = unwrap(exc)
        if not isinstance(cause, HaifError):  # a Ray system error: the task may have run
            breaker_says(False)
            logger.error("unexpected worker failure: %r", exc)
            return WorkerUnavailable(f"worker failed: {type(cause).__name__}"), idempotent
        if isinstance(cause, RetryableError):  # raised by the worker before any work
            if isinstance(cause, WorkerUnavailable):
                breaker_says(False)
            return cause, True
        if isinstance(cause, InternalError):  # the worker failed while working on it
            breaker_says(False)
            return cause, idempotent
        breaker_says(True)  # a request error: the worker itself is fine
        return cause, False

    async def _unary(self, item: WorkItem, kind: str, method: str) -> Dispatched:
        attributes = {tracing.MODEL: item.model}
        with tracing.span("orchestrator.route", item.ctx, attributes=attributes) as span:
            dispatched = await self._unary_attempts(item, kind, method)
            _routed(span, dispatched)
            return dispatched

    async def _unary_attempts(self, item: WorkItem, kind: str, method: str) -> Dispatched:
        pool = self._pool(item, kind)
        route = self._route(item, pool)
        avoid: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            slot = await self._acquire(pool, route, item, avoid, attempts)
            if slot is None:
                continue
            sent, actor = time.monotonic(), slot.actor
            try:
                ref = getattr(actor, method).remote(tracing.handoff(item))
            except BaseException:  # not sent (the item did not serialize...): the slot is free
                pool.release(slot)
                raise
            try:
                value = await asyncio.wait_for(_resolve(ref), timeout=item.ctx.remaining_s())
            except TimeoutError:
                pool.release(slot)
                ray.cancel(ref)
                raise _deadline(item) from None
            except asyncio.CancelledError:
                pool.release(slot)
                ray.cancel(ref)  # the caller is gone: free the worker
                raise
            except Exception as exc:
                pool.release(slot)
                avoid.add(slot.worker_id)
                await self._attempt_failed(pool, slot, actor, exc, item, sent, attempts)
                continue
            pool.release(slot)
            if slot.actor is actor:
                slot.breaker.success()
            return Dispatched(slot.worker_id, slot.region, attempts, value)

    async def _acquire(
        self, pool: ModelPool, route: Route, item: WorkItem, avoid: set[str], attempts: int
    ) -> WorkerSlot | None:
        """A worker, or None after a backoff when none is live yet and a retry may find one."""
        try:
            return await pool.acquire(route, item.ctx, frozenset(avoid))
        except (ModelNotReady, WorkerUnavailable) as exc:
            await self._back_off(exc, attempts, item)
            return None

    async def generate(self, item: WorkItem) -> Dispatched:
        return await self._unary(item, "generate", "generate")

    async def embed(self, item: WorkItem) -> Dispatched:
        return await self._unary(item, "embed", "embed")

    async def stream(self, item: WorkItem) -> AsyncIterator[Dispatched | StreamEvent]:
        """Stream events; the first item is the ``Dispatched`` record of where it runs,
        carrying the first event as its ``value`` (None when the stream had none).

        A failure before the first event is retried like a unary call; after it, the
        stream ends with the typed error (the Bridge turns it into an SSE error event).
        """
        attributes = {tracing.MODEL: item.model}
        with tracing.span("orchestrator.route", item.ctx, attributes=attributes) as span:
            async for event in self._stream_attempts(item):
                if isinstance(event, Dispatched):
                    _routed(span, event)
                yield event

    async def _stream_attempts(self, item: WorkItem) -> AsyncIterator[Dispatched | StreamEvent]:
        pool = self._pool(item, "generate")
        route = self._route(item, pool)
        avoid: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            slot = await self._acquire(pool, route, item, avoid, attempts)
            if slot is None:
                continue
            sent, actor = time.monotonic(), slot.actor
            try:
                gen = actor.generate_stream.options(num_returns="streaming").remote(tracing.handoff(item))
            except BaseException:  # not sent: the slot is free
                pool.release(slot)
                raise
            started = finished = False
            failure: Exception | None = None
            try:
                while True:
                    try:
                        ref = await asyncio.wait_for(gen.__anext__(), timeout=item.ctx.remaining_s())
                        event = await ref
                    except StopAsyncIteration:
                        finished = True
                        break
                    except TimeoutError:
                        raise _deadline(item) from None
                    except Exception as exc:
                        if started:
                            raise self._failure(pool, slot, actor, exc, item, sent)[0] from None
                        failure = exc
                        break
                    if started:
                        yield event
                    else:  # the first event rides in the record: one piece fewer per stream
                        started = True
                        yield Dispatched(slot.worker_id, slot.region, attempts, event)
            finally:
                pool.release(slot)
                if not finished:
                    # Client gone, deadline passed or error: stop the generation on the worker.
                    ray.cancel(gen)
            if finished:
                if slot.actor is actor:
                    slot.breaker.success()
                if not started:
                    yield Dispatched(slot.worker_id, slot.region, attempts)
                return
            if failure is None:
                raise InternalError("a stream attempt ended neither finished nor failed")
            avoid.add(slot.worker_id)
            await self._attempt_failed(pool, slot, actor, failure, item, sent, attempts)


def _tensor_parallel_strategy(plan: Placement) -> Any:
    """A placement group with one GPU bundle per tensor-parallel rank, packed on one node.

    Child tasks are captured, so the engine's Ray workers land in its bundles.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group(plan.placement_group_bundles(), strategy="STRICT_PACK")
    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)


async def _resolve(ref: Any) -> Any:
    return await ref


def _routed(span: Any, dispatched: Dispatched) -> None:
    tracing.set_attributes({
        tracing.WORKER: dispatched.worker, tracing.REGION: dispatched.region,
        "haif.attempts": dispatched.attempts,
    }, span)


def _deadline(item: WorkItem) -> DeadlineExceeded:
    return DeadlineExceeded(f"request {item.ctx.request_id} exceeded its deadline on model {item.model!r}")
