"""The Gateway: a Ray Serve deployment that admits requests and shapes the answers.

Admission (authentication, scope and model checks, rate limits, quota reservation,
idempotency) happens here for every entry point (HTTP Bridge, in-cluster SDK, P2P
shim), so that none can bypass it; every dispatched job is settled here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray

from haif.exceptions import AuthenticationFailed, HaifError, ModelNotFound
from haif.gateway.admission import Admission
from haif.gateway.auth import Authenticator, DatabaseAuthenticator, StaticKeyAuthenticator
from haif.gateway.metrics import GatewayMetrics
from haif.gateway.serving import StreamFormatter, chat_response, completion_response
from haif.protocol import ModelCard, ModelList, now
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs

if TYPE_CHECKING:
    from datetime import datetime

    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig, LimitsConfig
    from haif.envelope import EmbeddingResult, RequestContext, WorkItem
    from opentelemetry.trace import Span

    from haif.gateway.admission import Ticket
    from haif.protocol import ChatCompletionChunk, CompletionChunk
    from haif.store.db import Database

logger = logging.getLogger("haif.gateway")


def default_authenticator(config: HaifConfig) -> Authenticator:
    if not config.auth.dev_api_key:
        raise AuthenticationFailed("no API key is configured (auth.dev_api_key)")
    return StaticKeyAuthenticator(config.auth.dev_api_key, config.auth.dev_tenant)


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests, tools): no id to record
        return None


class Gateway:
    def __init__(self, config: HaifConfig, orchestrator: DeploymentHandle) -> None:
        self._region = config.regions[0].name
        tracing.setup_tracing(
            config.telemetry, "gateway", region=self._region, instance=_replica_id()
        )
        install_json_logs(config.telemetry, "gateway")
        self._config = config
        self._orchestrator = orchestrator
        self._stream_handle = orchestrator.options(stream=True)
        self._created = now()
        self._db: Database | None = None
        self._background: list[Any] = []  # coroutine factories, started once a loop runs
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        metrics = GatewayMetrics(ray_metrics=ray.is_initialized())
        if config.auth.backend == "static":
            self._admission = Admission(config, default_authenticator(config), metrics=metrics)
        else:
            self._admission = self._tenancy(config, metrics)
        self._start_background()

    def _tenancy(self, config: HaifConfig, metrics: GatewayMetrics) -> Admission:
        from haif.gateway.quota import QuotaGate
        from haif.gateway.upkeep import JobUpkeep
        from haif.store.db import Database

        # The schema was migrated by bootstrap before deploying: replicas only connect.
        self._db = db = Database.from_config(config)
        limiter = None
        if config.rate_limits_on_redis():
            from haif.gateway.ratelimit import RedisRateLimiter

            limiter = RedisRateLimiter(config.redis)
        upkeep = JobUpkeep(db, config)
        self._background.append(upkeep.run)
        if config.usage.webhook_url:
            from haif.gateway.usage_export import UsageExporter

            self._background.append(UsageExporter(db, config.usage).run)
        auth = DatabaseAuthenticator(
            db, config.auth.token_cache_ttl_s, config.auth.token_cache_max_entries
        )
        from haif.store.aio import AsyncWrites

        # On PostgreSQL the request's two writes go out from the event loop itself.
        quotas = QuotaGate(db, limiter, AsyncWrites.from_config(config))
        return Admission(
            config,
            auth,
            db=db,
            quotas=quotas,
            upkeep=upkeep,
            replica=_replica_id(),
            metrics=metrics,
        )

    def _start_background(self) -> None:
        if self._tasks or not self._background:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first request starts them
        self._tasks = [loop.create_task(run(self._stop)) for run in self._background]

    # --- endpoints -----------------------------------------------------------------------

    async def models(self, ctx: RequestContext) -> ModelList:
        self._start_background()
        with tracing.span("gateway.models", ctx):
            principal = await self._admission.authenticate(ctx)
            names = await self._orchestrator.models.remote()
        allowed = principal.allowed_models
        return ModelList(
            data=[
                ModelCard(id=n, created=self._created)
                for n in names
                if allowed is None or n in allowed
            ]
        )

    async def model(self, name: str, ctx: RequestContext) -> ModelCard:
        listing = await self.models(ctx)
        for card in listing.data:
            if card.id == name:
                return card
        raise ModelNotFound(f"the model {name!r} does not exist")

    async def generate(self, item: WorkItem) -> Any:
        self._start_background()
        with tracing.span("gateway.generate", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self._admission.admit(item)
            _admitted(span, ticket)
            if ticket.replay is not None:
                return ticket.replay
            try:
                outputs = await self._orchestrator.generate.remote(tracing.handoff(ticket.item))
            except BaseException as exc:
                await self._admission.fail(ticket, exc)
                raise
            shape = chat_response if item.kind == "chat" else completion_response
            response = shape(item.model, outputs, ticket.job_id)
            prompt_tokens = sum(o.prompt_tokens for o in outputs)
            completion_tokens = sum(o.completion_tokens for o in outputs)
            _served(span, prompt_tokens, completion_tokens)
            await self._admission.succeed(ticket, prompt_tokens, completion_tokens, response)
            return response

    async def stream(self, item: WorkItem) -> AsyncIterator[ChatCompletionChunk | CompletionChunk]:
        self._start_background()
        with tracing.span("gateway.stream", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self._admission.admit(item)
            _admitted(span, ticket)
            fmt = StreamFormatter(item.kind, item.model, item.include_usage, ticket.job_id)
            first = True
            try:
                async for event in self._stream_handle.stream.remote(tracing.handoff(ticket.item)):
                    if first:
                        # Sent only once the worker has produced something, so that errors
                        # before the first token reach the client as a plain HTTP error.
                        first = False
                        role = fmt.first()
                        if role is not None:
                            yield role
                    chunk = fmt.event(event)
                    if chunk is not None:
                        yield chunk
            except BaseException as exc:  # failed, or the client went away: bill what was sent
                _served(span, fmt.prompt_tokens, fmt.completion_tokens, ok=False)
                await self._admission.fail(ticket, exc, fmt.prompt_tokens, fmt.completion_tokens)
                raise
            _served(span, fmt.prompt_tokens, fmt.completion_tokens)
            await self._admission.succeed(ticket, fmt.prompt_tokens, fmt.completion_tokens)
            usage = fmt.usage_chunk()
            if usage is not None:
                yield usage

    async def embed(self, item: WorkItem) -> EmbeddingResult:
        self._start_background()
        with tracing.span("gateway.embed", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self._admission.admit(item)
            _admitted(span, ticket)
            if ticket.replay is not None:
                return ticket.replay
            try:
                result = await self._orchestrator.embed.remote(tracing.handoff(ticket.item))
                vectors = None
                if ticket.key is not None:  # kept for replays: fetch it if it came by reference
                    vectors = result.vectors
                    if isinstance(vectors, ray.ObjectRef):
                        vectors = await vectors
            except BaseException as exc:
                await self._admission.fail(ticket, exc)
                raise
            _served(span, result.prompt_tokens, 0)
            await self._admission.succeed(ticket, result.prompt_tokens, 0, result, vectors)
            return result

    def _attributes(self, item: WorkItem) -> dict[str, Any]:
        model = self._config.model(item.model)
        return {
            tracing.MODEL: item.model,
            tracing.MODEL_VERSION: model.version if model is not None else None,
            tracing.REGION: self._region,
        }

    # --- the tenant's own records --------------------------------------------------------

    async def job(self, job_id: str, ctx: RequestContext) -> dict[str, Any]:
        with tracing.span("gateway.job", ctx):
            return await self._admission.job(ctx, job_id)

    async def jobs(self, ctx: RequestContext, limit: int) -> list[dict[str, Any]]:
        with tracing.span("gateway.jobs", ctx):
            return await self._admission.jobs(ctx, limit)

    async def usage(
        self, ctx: RequestContext, since: datetime | None, limit: int
    ) -> list[dict[str, Any]]:
        with tracing.span("gateway.usage", ctx):
            return await self._admission.usage(ctx, since, limit)

    # --- introspection -------------------------------------------------------------------

    def limits(self) -> LimitsConfig:
        """The request limits, so that in-cluster clients build envelopes as the Bridge does."""
        return self._config.limits

    def stats(self) -> dict[str, Any]:
        """This replica's admission counters (Ray aggregates the same as metrics)."""
        return {"replica": _replica_id(), "outcomes": dict(self._admission.metrics.counts)}

    async def status(self) -> dict[str, Any]:
        status = await self._orchestrator.status.remote()
        if self._db is not None:
            try:
                await self._db.run(self._db.ping)
                status["database"] = "ok"
            except HaifError as exc:
                status["database"] = exc.message
                status["ready"] = False
        return status


def _admitted(span: Span, ticket: Ticket) -> None:
    principal = ticket.item.ctx.principal
    logger.debug("admitted %s on %s as job %s", ticket.item.kind, ticket.item.model, ticket.job_id)
    tenant = principal.tenant if principal is not None else None
    tracing.set_attributes({tracing.TENANT: tenant, "haif.job_id": ticket.job_id}, span)


def _served(span: Span, prompt_tokens: int, completion_tokens: int, *, ok: bool = True) -> None:
    attributes: dict[str, Any] = {
        tracing.PROMPT_TOKENS: prompt_tokens, tracing.COMPLETION_TOKENS: completion_tokens
    }
    if ok:
        attributes[tracing.STATUS] = "ok"
    tracing.set_attributes(attributes, span)
