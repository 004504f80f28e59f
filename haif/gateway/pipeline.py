"""The Gateway's request pipelines: one fixed sequence of steps per request kind.

Every inference request, whatever its entry point (HTTP, ``handle.remote()``, P2P),
runs through the same steps, in this order, in one Gateway replica::

    admit      authenticate, check the model and the endpoint, validate limits and the
               Idempotency-Key, reserve quota and record the job (haif.gateway.admission)
    route      pick a worker with the Orchestrator's policy, in this process
               (haif.orchestrator.router: tier, region, failover, load, breakers, queue)
    dispatch   call the worker actor directly (one Ray call; a stream is one Ray
               streaming call), retrying what is safe to retry
    format     shape the OpenAI response or the stream's chunks (haif.gateway.serving)
    settle     bill what was delivered, close the job, dead-letter a final failure

A step that refuses raises the typed ``HaifError``; mapping it to HTTP or to a handle's
answer happens once, at each boundary (haif.bridge.errors, haif.gateway.deployment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray

from haif.envelope import Dispatched
from haif.exceptions import HaifError, ModelNotFound, ModelNotReady
from haif.gateway.serving import StreamFormatter, chat_response, completion_response
from haif.protocol import ModelCard, ModelList, now
from haif.telemetry import tracing

if TYPE_CHECKING:
    from datetime import datetime

    from opentelemetry.trace import Span

    from haif.config import HaifConfig
    from haif.dlq import DeadLetter
    from haif.envelope import EmbeddingResult, RequestContext, WorkItem
    from haif.gateway.admission import Ticket
    from haif.gateway.compose import GatewayParts
    from haif.protocol import (
        ChatCompletionChunk,
        ChatCompletionResponse,
        CompletionChunk,
        CompletionResponse,
    )

logger = logging.getLogger("haif.gateway")

ARTIFACT_PROBE_TTL_S = 5.0
ARTIFACT_PROBE_TIMEOUT_S = 5.0
P2P_STATUS_TIMEOUT_S = 2.0


class Pipeline:
    """The request pipelines of one Gateway replica, over its collaborators.

    Args:
        config: HAIF's config.
        parts: the collaborators (``haif.gateway.compose``): admission, router, table...
    """

    def __init__(self, config: HaifConfig, parts: GatewayParts) -> None:
        self.config = config
        self.parts = parts
        self.admission = parts.admission
        self.router = parts.router
        self._created = now()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._artifact_probe: tuple[float, dict[str, str]] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the background work (table long-poll, settlements...) once a loop runs."""
        if self._tasks or not self.parts.background:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first request starts them
        self._tasks = [loop.create_task(run(self._stop)) for run in self.parts.background]

    async def stop(self) -> None:
        """Stop the background work; quota leases give back what they did not hand out."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    async def _routable(self, item: WorkItem) -> None:
        """Wait (within the deadline) for the first routing table of this replica."""
        table = self.parts.table
        if table is None or self.router.version is not None:
            return
        if await table.first(item.ctx.remaining_s()) is None:
            raise ModelNotReady(f"model {item.base!r}: this Gateway has no routing table yet")

    # --- models ------------------------------------------------------------------------

    async def models(self, ctx: RequestContext) -> ModelList:
        self.start()
        with tracing.span("gateway.models", ctx):
            principal = await self.admission.authenticate(ctx)
        listed = self.admission.catalog.listed(principal.allowed_models)
        return ModelList(
            data=[ModelCard(id=name, created=self._created, parent=parent) for name, parent in listed]
        )

    async def model(self, name: str, ctx: RequestContext) -> ModelCard:
        listing = await self.models(ctx)
        for card in listing.data:
            if card.id == name:
                return card
        raise ModelNotFound(f"the model {name!r} does not exist")

    # --- generation: admit → route → dispatch → format → settle ----------------------------

    async def generate(self, item: WorkItem) -> CompletionResponse | ChatCompletionResponse:
        self.start()
        with tracing.span("gateway.generate", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self.admission.admit(item)
            _admitted(span, ticket)
            return await self._generate(ticket, span)

    async def _generate(self, ticket: Ticket, span: Span | None = None) -> Any:
        if ticket.replay is not None:
            return ticket.replay
        item = ticket.item
        try:
            await self._routable(item)
            # handoff: the route span is a child of this request's span.
            dispatched = await self.router.call(tracing.handoff(item), "generate")
            ticket.ran_on(dispatched)
        except BaseException as exc:
            await self.admission.fail(ticket, exc)
            raise
        shape = chat_response if item.kind == "chat" else completion_response
        response = shape(
            item.served_model, dispatched.value, ticket.job_id, item.n_choices, item.shaping,
            fingerprint=_served_version(span, ticket),
        )
        usage = response.usage
        _served(span, ticket, usage.prompt_tokens, usage.completion_tokens)
        await self.admission.succeed(ticket, usage.prompt_tokens, usage.completion_tokens, response)
        return response

    async def stream(self, item: WorkItem) -> AsyncIterator[ChatCompletionChunk | CompletionChunk]:
        """The chunks of a streamed answer. Its usage leaves with its last text; the answer
        is billed in full once its last chunk is passed on, whatever happens after."""
        self.start()
        with tracing.span("gateway.stream", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self.admission.admit(item)
            _admitted(span, ticket)
            admitted = ticket.item  # named as admission resolved it, as a plain answer is
            fmt = StreamFormatter(
                admitted.kind, admitted.served_model, admitted.include_usage, ticket.job_id,
                admitted.n_choices, admitted.shaping,
            )
            delivered = False  # every choice's last event has been passed on
            try:
                await self._routable(ticket.item)
                # aclosing: a consumer that stops stops the worker's generation now.
                async with contextlib.aclosing(self.router.stream(tracing.handoff(ticket.item))) as events:
                    async for event in events:
                        if isinstance(event, Dispatched):
                            ticket.ran_on(event)
                            fmt.fingerprint = _served_version(span, ticket)
                            event = event.value  # the first event rides in the record
                            if event is None:
                                continue
                        chunks = fmt.chunks(event)
                        # The last event completes the answer: passed on, it is delivered.
                        delivered = fmt.finished
                        for chunk in chunks:
                            yield chunk
            except BaseException as exc:  # failed, or the client went away: bill what was sent
                if not delivered:
                    _served(span, ticket, fmt.prompt_tokens, fmt.completion_tokens, ok=False)
                    await self.admission.fail(ticket, exc, fmt.prompt_tokens, fmt.completion_tokens)
                    raise
                # The client has its whole answer: what went wrong after it (a consumer that
                # stopped at the last chunk) changes nothing in what it is billed.
                _served(span, ticket, fmt.prompt_tokens, fmt.completion_tokens)
                await self.admission.succeed(ticket, fmt.prompt_tokens, fmt.completion_tokens)
                if isinstance(exc, Exception):
                    logger.debug("stream %s: %s after its last chunk", item.ctx.request_id, type(exc).__name__)
                    return
                raise  # cancellation and generator exit keep going
            _served(span, ticket, fmt.prompt_tokens, fmt.completion_tokens)
            await self.admission.succeed(ticket, fmt.prompt_tokens, fmt.completion_tokens)
            if not delivered:  # a stream that ended without a finish reason
                usage = fmt.usage_chunk()
                if usage is not None:
                    yield usage

    # --- embeddings ------------------------------------------------------------------------

    async def embed(self, item: WorkItem) -> EmbeddingResult:
        self.start()
        with tracing.span("gateway.embed", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self.admission.admit(item)
            _admitted(span, ticket)
            return await self._embed(ticket, span)

    async def _embed(self, ticket: Ticket, span: Span | None = None) -> EmbeddingResult:
        if ticket.replay is not None:
            return ticket.replay
        try:
            await self._routable(ticket.item)
            dispatched = await self.router.call(tracing.handoff(ticket.item), "embed")
            ticket.ran_on(dispatched)
            _served_version(span, ticket)
            result = dispatched.value
            vectors = None
            if ticket.key is not None:  # kept for replays: fetch it if it came by reference
                vectors = result.vectors
                if isinstance(vectors, ray.ObjectRef):
                    vectors = await vectors
        except BaseException as exc:
            await self.admission.fail(ticket, exc)
            raise
        _served(span, ticket, result.prompt_tokens, 0)
        await self.admission.succeed(ticket, result.prompt_tokens, 0, result, vectors)
        return result

    @staticmethod
    def _attributes(item: WorkItem) -> dict[str, Any]:
        # The name as sent: admission resolves it and names the base, its version and the
        # adapter on this span.
        return {tracing.MODEL: item.model}

    # --- the DLQ ---------------------------------------------------------------------------

    async def replay_dead_letter(self, entry: DeadLetter | dict[str, Any]) -> dict[str, Any]:
        """Submit a dead letter again (``haif dlq replay``); trusted in-cluster callers only.

        Returns ``{"job_id", "executed", "state"}``: ``executed`` is False when the job had
        already been replayed (the stored answer of that execution stands).
        """
        from haif.gateway.replay import replay_item

        self.start()
        item, principal = await replay_item(self.config, self.parts.db, entry)
        ticket = await self.admission.admit_trusted(item, principal)
        executed = ticket.replay is None
        if item.kind == "embedding":
            await self._embed(ticket)
        else:
            await self._generate(ticket)
        return {"job_id": ticket.job_id, "executed": executed, "state": "succeeded"}

    async def auth_changed(self) -> None:
        """What authenticates changed (a revoked token, a suspended tenant): this replica's
        cached credentials go now, the other replicas' with the Orchestrator's next table,
        which it publishes at once."""
        if self.parts.auth_changed is not None:
            await self.parts.auth_changed()

    # --- the tenant's own records ----------------------------------------------------------

    async def job(self, job_id: str, ctx: RequestContext) -> dict[str, Any]:
        with tracing.span("gateway.job", ctx):
            return await self.admission.job(ctx, job_id)

    async def jobs(self, ctx: RequestContext, limit: int) -> list[dict[str, Any]]:
        with tracing.span("gateway.jobs", ctx):
            return await self.admission.jobs(ctx, limit)

    async def usage(self, ctx: RequestContext, since: datetime | None, limit: int) -> list[dict[str, Any]]:
        with tracing.span("gateway.usage", ctx):
            return await self.admission.usage(ctx, since, limit)

    # --- readiness -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Readiness, from this replica's routing table: every enabled model has a ready
        worker. The metadata store down: not ready (requests would get 503). Redis down:
        ready, degraded (rate limits count in the store, the DLQ writes to its table),
        unless ``quotas.redis_unavailable`` is ``reject``."""
        self.start()
        status = self._models_status()
        if any(m.enabled and m.artifact for m in self.config.models):
            replicas = await self._probe_artifact_store()
            reachable = sum(v == "ok" for v in replicas.values())
            status["artifact_store"] = {"replicas": replicas, "reachable": reachable}
            if not reachable:  # reads fall back across replicas: one is enough to load models
                status["ready"] = False
        db = self.parts.db
        if db is not None:
            try:
                await db.run(db.ping)
                status["database"] = "ok"
            except HaifError as exc:
                status["database"] = exc.message
                status["ready"] = False
            if self.admission.settlements is not None:
                status["pending_settlements"] = len(self.admission.settlements)
        if self.parts.p2p is not None:  # degraded while the sidecar is down; HTTP serves on
            status["p2p"] = await self._p2p_status()
        if self.config.redis.url and (self.parts.limiter is not None or self.parts.dlq is not None):
            status["redis"] = await self._redis_status()
            if status["redis"] != "ok" and self.config.quotas.redis_unavailable == "reject":
                status["ready"] = False
        return status

    def _models_status(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for model in self.config.models:
            if not model.enabled:
                continue
            router = self.router.models.get(model.name)
            if router is None:
                models[model.name] = {
                    "state": "loading", "runtime": model.runtime, "device": "cpu", "workers": 0,
                    "ready_workers": 0, "error": "no routing table yet",
                }
                continue
            routes = router.routes
            states = [w.state for w in routes.workers]
            ready = states.count("ready")
            if routes.unplaceable is not None:
                state, error = "failed", routes.unplaceable
            elif ready or routes.scaled_to_zero:  # scaled to zero: a request starts a worker
                state, error = "ready", None
            elif any(s in ("loading", "dead", "pending") for s in states) or routes.replacing:
                state, error = "loading", None
            else:
                state, error = "failed", routes.error or "no workers"
            models[model.name] = {
                "state": state,
                "runtime": model.runtime,
                "device": routes.device,
                "workers": len(states),
                "ready_workers": ready,
                "min_workers": model.initial_workers * len(self.config.model_regions(model))
                * (1 + len(model.dedicated_tenants)),
                "workers_by_state": {s: states.count(s) for s in sorted(set(states))},
                "regions": sorted({w.region for w in routes.workers}),
                "versions": _versions(routes.workers),
                "weights": dict(routes.weights),
                "stable_version": routes.stable,
                "scaled_to_zero": routes.scaled_to_zero,
                "autoscaler": routes.autoscaler,
                "ongoing": sum(w.load for w in routes.workers) + router.queued,
                "error": error,
                **router.status(),
            }
        return {
            "ready": all(m["state"] == "ready" for m in models.values()),
            "models": models,
            "retries": self.router.retries,
            "table_version": self.router.version,
        }

    async def _probe_artifact_store(self) -> dict[str, str]:
        """Replica reachability, probed at most every ARTIFACT_PROBE_TTL_S and within a timeout."""
        at = time.monotonic()
        if self._artifact_probe is not None and at - self._artifact_probe[0] < ARTIFACT_PROBE_TTL_S:
            return self._artifact_probe[1]
        from haif.artifacts.store import ArtifactStore  # lazy: fsspec

        store = ArtifactStore.from_config(self.config.artifacts, self.config.base_path())
        try:
            result = await asyncio.wait_for(asyncio.to_thread(store.probe), ARTIFACT_PROBE_TIMEOUT_S)
        except TimeoutError:
            result = {r.label: f"no answer within {ARTIFACT_PROBE_TIMEOUT_S:g}s" for r in store.replicas}
        self._artifact_probe = (at, result)
        return result

    async def _p2p_status(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.parts.p2p.status.remote(), P2P_STATUS_TIMEOUT_S)  # type: ignore[union-attr]
        except Exception as exc:  # the shim's replica is down or restarting
            return {"state": f"degraded: the P2P shim did not answer ({type(exc).__name__})"}

    async def _redis_status(self) -> str:
        from redis.exceptions import RedisError

        try:
            if self.parts.limiter is not None:
                await self.parts.limiter.ping()
            elif self.parts.dlq is not None and self.parts.db is not None:
                await self.parts.db.run(self.parts.dlq.ping)
            return "ok"
        except RedisError as exc:
            return f"unavailable ({type(exc).__name__}); degraded: the metadata store stands in"

    def record_routing_metrics(self) -> None:
        """Queue depth and breaker states of this replica (sampled by its metrics pusher)."""
        metrics = self.parts.routing_metrics
        if metrics is None:
            return
        for name, router in list(self.router.models.items()):
            metrics.queue_depth(name, router.queued)
            for backend in list(router.backends.values()):
                metrics.circuit_state(name, backend.worker_id, int(backend.breaker.state))


def _versions(workers: Any) -> dict[str, dict[str, dict[str, int]]]:
    """Per version: its workers by state and by region."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for w in workers:
        entry = out.setdefault(w.version, {"workers_by_state": {}, "workers_by_region": {}})
        entry["workers_by_state"][w.state] = entry["workers_by_state"].get(w.state, 0) + 1
        entry["workers_by_region"][w.region] = entry["workers_by_region"].get(w.region, 0) + 1
    return out


def _admitted(span: Span, ticket: Ticket) -> None:
    item = ticket.item
    principal = item.ctx.principal
    logger.debug("admitted %s on %s as job %s", item.kind, item.served_model, ticket.job_id)
    tenant = principal.tenant if principal is not None else None
    tracing.set_attributes({tracing.TENANT: tenant, "haif.job_id": ticket.job_id}, span)


def _served_version(span: Span | None, ticket: Ticket) -> str:
    """``"<model>:<version>"`` of the version that ran ``ticket`` (the response's
    ``system_fingerprint``); the request span names the version too."""
    version = ticket.served_version or "1"
    if span is not None:
        tracing.set_attributes({tracing.MODEL_VERSION: version}, span)
    return f"{ticket.item.base}:{version}"


def _served(
    span: Span | None, ticket: Ticket, prompt_tokens: int, completion_tokens: int, *, ok: bool = True
) -> None:
    if span is None:  # a DLQ replay: no request span
        return
    attributes: dict[str, Any] = {
        tracing.PROMPT_TOKENS: prompt_tokens,
        tracing.COMPLETION_TOKENS: completion_tokens,
        tracing.WORKER: ticket.worker,
        tracing.REGION: ticket.region,
        "haif.attempts": ticket.attempts,
    }
    if ok:
        attributes[tracing.STATUS] = "ok"
    tracing.set_attributes(attributes, span)
