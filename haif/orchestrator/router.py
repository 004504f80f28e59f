"""The data-plane half of the Orchestrator: how a Gateway replica calls a worker.

The Orchestrator decides the fleet and publishes it as a routing table; each Gateway
replica runs this router in its own process (as every Ray Serve handle runs Serve's
request router), so a request goes Gateway → worker actor with no hop in between.
Which worker a request gets is ``haif.orchestrator.backends``'s choice.

Calling it (``Router.call`` / ``Router.stream``): a failed attempt is retried on another
worker, with full-jitter exponential backoff, only when that is safe (it cannot have run,
or the request carries an Idempotency-Key), within ``max_attempts`` and the deadline.
A worker that dies under a request is routed around at once and reported to the
Orchestrator (``on_dead``), which replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from haif.envelope import Dispatched
from haif.handles import answer
from haif.exceptions import (
    DeadlineExceeded,
    HaifError,
    InternalError,
    ModelNotFound,
    ModelNotReady,
    RetryableError,
    WorkerDraining,
    WorkerUnavailable,
    unwrap,
)
from haif.orchestrator.backends import Backend, ModelRouter, Route, new_breaker
from haif.orchestrator.breaker import Backoff
from haif.orchestrator.table import SHARED_TIER, RoutingTable, WorkerRoute
from haif.telemetry import tracing

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig
    from haif.envelope import WorkItem
    from haif.runtimes.base import StreamEvent

logger = logging.getLogger("haif.gateway")

ACTOR_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class Router:
    """Every model's ``ModelRouter``, kept in step with the routing table, and the calls.

    Args:
        config: HAIF's config (resilience, regions, sharding, models' queue bounds).
        on_dead: called with the id of a worker that died under a request (the Gateway
            tells the Orchestrator, which replaces it); must not block.
        p2p: the P2P shim's handle, through which remote P2P workers are called.
    """

    def __init__(
        self,
        config: HaifConfig,
        on_dead: Callable[[str], None] | None = None,
        p2p: DeploymentHandle | None = None,
        on_demand: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._p2p = p2p  # the P2P shim: the way to remote P2P workers
        self._res = res = config.resilience
        self._backoff = Backoff(res.retry_backoff_initial_ms / 1000, res.retry_backoff_max_ms / 1000)
        self._on_dead = on_dead or (lambda _worker: None)
        self._on_demand = on_demand or (lambda _model: None)
        self._rng = random.Random()
        self.models: dict[str, ModelRouter] = {}
        self.retries = 0
        self.version: str | None = None

    def update(self, table: RoutingTable) -> None:
        for name, routes in table.models.items():
            router = self.models.get(name)
            if router is None:
                model = self._config.model(name)
                self.models[name] = router = ModelRouter(
                    routes,
                    max_queued=model.max_queued if model is not None else 0,
                    overloaded_retry_after_s=self._res.overloaded_retry_after_s,
                    new_breaker=lambda: new_breaker(self._res),
                    connect=_connect,
                    demand=self._on_demand,
                    adapter_spill_margin=model.adapter_spill_margin if model is not None else 0,
                )
            router.update(routes)
        for gone in set(self.models) - set(table.models):
            del self.models[gone]
        self.version = table.version

    def version_of(self, model: str, key: str | None) -> str:
        """The version a request of ``model`` goes to (``ModelRoutes.version_for``): sticky
        for ``key``, weighted at random without; the config's version before any table."""
        router = self.models.get(model)
        if router is None:
            config = self._config.model(model)
            return config.version if config is not None else "1"
        return router.routes.version_for(key, self._rng.random())

    def queued(self) -> dict[str, int]:
        """Requests waiting for a worker, by model (the Orchestrator's autoscaler counts them)."""
        return {name: router.queued for name, router in self.models.items() if router.queued}

    def model(self, name: str) -> ModelRouter:
        router = self.models.get(name)
        if router is None:
            raise ModelNotFound(f"the model {name!r} does not exist")
        return router

    def route(self, item: WorkItem) -> Route:
        principal = item.ctx.principal
        tenant = principal.tenant if principal is not None else None
        model = self._config.model(item.base)
        dedicated = model.dedicated_tenants if model is not None else []
        tier = tenant if tenant is not None and tenant in dedicated else SHARED_TIER
        return Route(tier=tier, regions=(self._config.home_region(tenant),))

    # --- unary calls ----------------------------------------------------------------

    async def call(self, item: WorkItem, method: str) -> Dispatched:
        """Run ``method`` (``generate`` or ``embed``) of a worker of ``item.base``."""
        with tracing.span("gateway.route", item.ctx, attributes=_route_attributes(item)) as span:
            dispatched = await self._call_attempts(item, method)
            _routed(span, dispatched)
            return dispatched

    async def _call_attempts(self, item: WorkItem, method: str) -> Dispatched:
        router = self.model(item.base)
        route = self.route(item)
        avoid: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            backend = await self._acquire(router, route, item, avoid, attempts)
            if backend is None:
                continue
            sent = time.monotonic()
            try:
                ref = self._send(backend, method, tracing.handoff(item))
            except BaseException:  # not sent (the item did not serialize...): the slot is free
                router.release(backend)
                raise
            try:
                value = answer(await asyncio.wait_for(_resolve(ref), timeout=item.ctx.remaining_s()))
            except TimeoutError:
                router.release(backend)
                _cancel(ref)
                raise _deadline(item) from None
            except asyncio.CancelledError:
                router.release(backend)
                _cancel(ref)  # the caller is gone: free the worker
                raise
            except Exception as exc:
                router.release(backend)
                avoid.add(backend.worker_id)
                if _draining(router, backend, exc):
                    attempts -= 1  # refused before any work: another worker, at once
                    continue
                await self._attempt_failed(router, backend, exc, item, sent, attempts)
                continue
            router.release(backend)
            backend.breaker.success()
            return Dispatched(backend.worker_id, backend.region, attempts, value, backend.version)

    # --- streams -------------------------------------------------------------------

    async def stream(self, item: WorkItem) -> AsyncIterator[Dispatched | StreamEvent]:
        """Stream events of one worker's Ray streaming call; the first item is the
        ``Dispatched`` record of where it runs, carrying the first event as its ``value``
        (None when the stream had none).

        A failure before the first event is retried like a unary call; after it, the
        stream ends with the typed error (the HTTP edge turns it into an SSE error event).
        """
        with tracing.span("gateway.route", item.ctx, attributes=_route_attributes(item)) as span:
            async for event in self._stream_attempts(item):
                if isinstance(event, Dispatched):
                    _routed(span, event)
                yield event

    async def _stream_attempts(self, item: WorkItem) -> AsyncIterator[Dispatched | StreamEvent]:
        router = self.model(item.base)
        route = self.route(item)
        avoid: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            backend = await self._acquire(router, route, item, avoid, attempts)
            if backend is None:
                continue
            sent = time.monotonic()
            try:
                gen = self._send_stream(backend, tracing.handoff(item))
            except BaseException:  # not sent: the slot is free
                router.release(backend)
                raise
            started = finished = False
            failure: Exception | None = None
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(_next_event(gen), timeout=item.ctx.remaining_s())
                    except StopAsyncIteration:
                        finished = True
                        break
                    except TimeoutError:
                        raise _deadline(item) from None
                    except Exception as exc:
                        if started:
                            raise self._failure(router, backend, exc, item, sent)[0] from None
                        failure = exc
                        break
                    if started:
                        yield event
                    else:  # the first event rides in the record: one piece fewer per stream
                        started = True
                        yield Dispatched(backend.worker_id, backend.region, attempts, event, backend.version)
            finally:
                router.release(backend)
                if not finished:
                    # Client gone, deadline passed or error: stop the generation on the worker.
                    _cancel(gen)
            if finished:
                backend.breaker.success()
                if not started:
                    yield Dispatched(backend.worker_id, backend.region, attempts, version=backend.version)
                return
            if failure is None:
                raise InternalError("a stream attempt ended neither finished nor failed")
            avoid.add(backend.worker_id)
            if _draining(router, backend, failure):
                attempts -= 1  # refused before any work: another worker, at once
                continue
            await self._attempt_failed(router, backend, failure, item, sent, attempts)

    # --- transports: a Ray actor, or a remote P2P worker through the P2P shim -------------

    def _send(self, backend: Backend, method: str, item: WorkItem) -> Any:
        peer = backend.route.peer
        if peer is None:
            return getattr(backend.actor, method).remote(item)
        if self._p2p is None:
            raise WorkerUnavailable(f"P2P worker {backend.worker_id}: this Gateway has no P2P shim")
        return self._p2p.worker_call.remote(peer, item)

    def _send_stream(self, backend: Backend, item: WorkItem) -> Any:
        peer = backend.route.peer
        if peer is None:
            return backend.actor.generate_stream.options(num_returns="streaming").remote(item)
        if self._p2p is None:
            raise WorkerUnavailable(f"P2P worker {backend.worker_id}: this Gateway has no P2P shim")
        return self._p2p.options(stream=True).worker_stream.remote(peer, item)

    # --- failures --------------------------------------------------------------------

    async def _acquire(
        self, router: ModelRouter, route: Route, item: WorkItem, avoid: set[str], attempts: int
    ) -> Backend | None:
        """A worker, or None after a backoff when none is live yet and a retry may find one."""
        adapter = item.adapter.name if item.adapter is not None else None
        try:
            return await router.acquire(route, item.ctx, frozenset(avoid), adapter, item.version)
        except (ModelNotReady, WorkerUnavailable) as exc:
            await self._back_off(exc, attempts, item)
            return None

    async def _attempt_failed(
        self, router: ModelRouter, backend: Backend, exc: Exception, item: WorkItem, sent: float,
        attempts: int,
    ) -> None:
        """Raise the typed error of a failed attempt when it is final; else back off."""
        err, retry = self._failure(router, backend, exc, item, sent)
        if not retry:
            err.attempts = attempts  # type: ignore[attr-defined]
            raise err
        await self._back_off(err, attempts, item, backend.worker_id)

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
            item.ctx.request_id, attempts, worker or item.base, err.code, delay * 1000,
        )
        await asyncio.sleep(delay)

    def _failure(
        self, router: ModelRouter, backend: Backend, exc: Exception, item: WorkItem, sent: float
    ) -> tuple[HaifError, bool]:
        """The typed error of a failed attempt, and whether another attempt is safe.

        Retried: errors the worker raised before doing any work (not ready, overloaded,
        unavailable), and a dead worker when this replica knew it was dead before the
        request was sent. A request that may already have run on a worker that died or
        failed unexpectedly is retried only when it carries an idempotency key.
        """
        idempotent = item.ctx.idempotency_key is not None
        if isinstance(exc, ACTOR_GONE):
            known_dead_before = backend.dead_at is not None and backend.dead_at < sent
            if router.saw_dead(backend):
                logger.warning("worker %s died under a request; routing around it", backend.worker_id)
                self._on_dead(backend.worker_id)
            return WorkerUnavailable(
                f"the worker serving {item.base!r} died; retry (send an Idempotency-Key to let HAIF retry)"
            ), idempotent or known_dead_before
        cause = unwrap(exc)
        if not isinstance(cause, HaifError):  # a Ray system error: the task may have run
            backend.breaker.failure()
            logger.error("unexpected worker failure on %s: %r", backend.worker_id, exc)
            return WorkerUnavailable(f"worker failed: {type(cause).__name__}"), idempotent
        if isinstance(cause, RetryableError):  # raised by the worker before any work
            if isinstance(cause, WorkerUnavailable):
                backend.breaker.failure()
            return cause, True
        if isinstance(cause, InternalError):  # the worker failed while working on it
            backend.breaker.failure()
            return cause, idempotent
        backend.breaker.success()  # a request error: the worker itself is fine
        return cause, False


def _draining(router: ModelRouter, backend: Backend, exc: Exception) -> bool:
    """Whether ``backend`` refused the request because it drains (it did no work): the
    request goes to another worker without a backoff and without spending an attempt, so
    that no request fails because of a drain."""
    if not isinstance(unwrap(exc), WorkerDraining):
        return False
    router.saw_draining(backend)
    return True


def _connect(route: WorkerRoute) -> None:
    """Ping a worker that joined the table, without waiting for the answer: Ray resolves a
    handle's actor on its first call, and the first request should not be that call."""
    if route.actor is not None:
        route.actor.ping.remote()


async def _next_event(gen: Any) -> Any:
    """The next event of a worker's stream: a Ray streaming call yields object refs, the P2P
    shim's Serve stream the events themselves (a failure as a ``Refused``)."""
    item = await gen.__anext__()
    if isinstance(item, ray.ObjectRef):
        return await item
    return answer(item)


def _cancel(call: Any) -> None:
    """Stop a call: a Ray task or streaming call, or a Serve handle call (to the P2P shim)."""
    if isinstance(call, (ray.ObjectRef, ray.ObjectRefGenerator)):
        ray.cancel(call)
    else:
        call.cancel()


def _route_attributes(item: WorkItem) -> dict[str, Any]:
    return {tracing.MODEL: item.base, tracing.ADAPTER: item.adapter.name if item.adapter else None}


async def _resolve(ref: Any) -> Any:
    return await ref


def _routed(span: Any, dispatched: Dispatched) -> None:
    tracing.set_attributes({
        tracing.WORKER: dispatched.worker, tracing.REGION: dispatched.region,
        "haif.attempts": dispatched.attempts,
    }, span)


def _deadline(item: WorkItem) -> DeadlineExceeded:
    return DeadlineExceeded(f"request {item.ctx.request_id} exceeded its deadline on model {item.base!r}")
