"""The Gateway: a Ray Serve deployment that admits requests and shapes the answers.

Admission (authentication, scope and model checks, rate limits, quota reservation,
idempotency) happens here for every entry point (HTTP Bridge, in-cluster SDK, P2P
shim), so that none can bypass it; every dispatched job is settled here too, and a
job that fails finally is dead-lettered here (``replay_dead_letter`` submits it again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray

from haif.envelope import Dispatched
from haif.exceptions import AuthenticationFailed, HaifError, ModelNotFound
from haif.gateway.admission import Admission
from haif.gateway.auth import Authenticator, DatabaseAuthenticator, StaticKeyAuthenticator
from haif.gateway.metrics import GatewayMetrics
from haif.gateway.serving import StreamFormatter, chat_response, completion_response
from haif.handles import transported
from haif.protocol import ModelCard, ModelList, now
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs
from haif.telemetry.metrics import MetricsTarget, ProcessMetrics

if TYPE_CHECKING:
    from datetime import datetime

    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig, LimitsConfig
    from haif.dlq import DeadLetter, DeadLetterQueue
    from haif.envelope import EmbeddingResult, RequestContext, WorkItem
    from opentelemetry.trace import Span

    from haif.gateway.admission import Ticket
    from haif.gateway.lease import QuotaLeases
    from haif.gateway.ratelimit import RedisRateLimiter
    from haif.protocol import ChatCompletionChunk, CompletionChunk
    from haif.store.db import Database

logger = logging.getLogger("haif.gateway")

ARTIFACT_PROBE_TTL_S = 5.0
ARTIFACT_PROBE_TIMEOUT_S = 5.0


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
        self._orchestrator = orchestrator = transported(orchestrator, config)
        self._stream_handle = orchestrator.options(stream=True)
        self._created = now()
        self._db: Database | None = None
        self._dlq: DeadLetterQueue | None = None
        self._limiter: RedisRateLimiter | None = None
        self._leases: QuotaLeases | None = None
        self._background: list[Any] = []  # coroutine factories, started once a loop runs
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._artifact_probe: tuple[float, dict[str, str]] | None = None
        self._metrics = ProcessMetrics.start(MetricsTarget.from_config(config), "gateway")
        metrics = GatewayMetrics(self._metrics, (m.name for m in config.models))
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
        from haif.dlq import DeadLetterQueue
        from haif.gateway.settlement import Settlements
        from haif.store.aio import AsyncWrites

        # On PostgreSQL the request's two writes go out from the event loop itself, and
        # most requests are admitted on a quota lease, with no round trip before dispatch.
        writes = AsyncWrites.from_config(config)
        leases = None
        if writes is not None and config.quotas.lease_fraction > 0:
            from haif.gateway.lease import QuotaLeases

            leases = QuotaLeases(
                writes,
                config.quotas,
                on_event=lambda event: metrics.registry.inc("haif_quota_leases_total", (event,)),
                record_after_s=config.jobs.mark_running_after_s / 2,
            )
            self._background.append(leases.run)  # idle leases give back; all of them at stop
        quotas = QuotaGate(
            db,
            limiter,
            writes,
            leases=leases,
            redis_unavailable=config.quotas.redis_unavailable,
            redis_retry_after_s=config.quotas.redis_retry_after_s,
        )
        self._limiter = limiter
        self._leases = leases
        self._dlq = DeadLetterQueue(config, db)
        settlements = Settlements(quotas, db, self._dlq, config.jobs)
        self._background.append(settlements.run)  # settlements the store refused, retried
        upkeep = JobUpkeep(db, config, settlements.pending)
        self._background.append(upkeep.run)
        if config.usage.webhook_url:
            from haif.gateway.usage_export import UsageExporter

            self._background.append(UsageExporter(db, config.usage).run)
        auth = DatabaseAuthenticator(
            db, config.auth.token_cache_ttl_s, config.auth.token_cache_max_entries
        )
        return Admission(
            config,
            auth,
            db=db,
            quotas=quotas,
            upkeep=upkeep,
            replica=_replica_id(),
            metrics=metrics,
            settlements=settlements,
        )

    def _start_background(self) -> None:
        if self._tasks or not self._background:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first request starts them
        self._tasks = [loop.create_task(run(self._stop)) for run in self._background]

    async def __del__(self) -> None:
        """Serve's graceful shutdown of the replica: the background work stops, and the
        quota leases give back what they did not hand out."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

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
            return await self._generate(item, ticket, span)

    async def _generate(self, item: WorkItem, ticket: Ticket, span: Span | None = None) -> Any:
        if ticket.replay is not None:
            return ticket.replay
        try:
            dispatched = await self._orchestrator.generate.remote(tracing.handoff(ticket.item))
            ticket.ran_on(dispatched)
            outputs = dispatched.value
        except BaseException as exc:
            await self._admission.fail(ticket, exc)
            raise
        shape = chat_response if item.kind == "chat" else completion_response
        response = shape(item.model, outputs, ticket.job_id, item.n_choices)
        prompt_tokens, completion_tokens = response.usage.prompt_tokens, response.usage.completion_tokens
        _served(span, ticket, prompt_tokens, completion_tokens)
        await self._admission.succeed(ticket, prompt_tokens, completion_tokens, response)
        return response

    async def stream(self, item: WorkItem) -> AsyncIterator[ChatCompletionChunk | CompletionChunk]:
        self._start_background()
        with tracing.span("gateway.stream", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self._admission.admit(item)
            _admitted(span, ticket)
            fmt = StreamFormatter(item.kind, item.model, item.include_usage, ticket.job_id, item.n_choices)
            first = True
            ended = False  # the last event (it carries the finish reason) has been passed on
            after_end: BaseException | None = None
            try:
                async for record in self._stream_handle.stream.remote(tracing.handoff(ticket.item)):
                    event = record
                    if isinstance(record, Dispatched):
                        ticket.ran_on(record)
                        event = record.value  # the first event rides in the record
                        if event is None:
                            continue
                    if first:
                        # Sent only once the worker has produced something, so that errors
                        # before the first token reach the client as a plain HTTP error.
                        first = False
                        role = fmt.first()
                        if role is not None:
                            yield role
                    chunk = fmt.event(event)
                    # The last event (of the last choice) completes the answer: passed on,
                    # it is delivered.
                    ended = fmt.finished
                    if chunk is not None:
                        yield chunk
                    if ended:
                        # Its usage leaves now, not once the end of the stream has come
                        # back through the hops (the client waits on it).
                        usage = fmt.usage_chunk()
                        if usage is not None:
                            yield usage
            except BaseException as exc:  # failed, or the client went away: bill what was sent
                if not ended:
                    _served(span, ticket, fmt.prompt_tokens, fmt.completion_tokens, ok=False)
                    await self._admission.fail(ticket, exc, fmt.prompt_tokens, fmt.completion_tokens)
                    raise
                # The client has its whole answer; what went wrong after it (the end of the
                # stream on its way back, a consumer that stopped at the last chunk) changes
                # nothing in what it is billed.
                after_end = exc
                logger.debug("stream %s: %s after its last event", item.ctx.request_id, type(exc).__name__)
            _served(span, ticket, fmt.prompt_tokens, fmt.completion_tokens)
            await self._admission.succeed(ticket, fmt.prompt_tokens, fmt.completion_tokens)
            if after_end is not None:
                if isinstance(after_end, Exception):
                    return
                raise after_end  # cancellation and generator exit keep going
            if not ended:  # a stream that ended without a finish reason
                usage = fmt.usage_chunk()
                if usage is not None:
                    yield usage

    async def embed(self, item: WorkItem) -> EmbeddingResult:
        self._start_background()
        with tracing.span("gateway.embed", item.ctx, attributes=self._attributes(item)) as span:
            ticket = await self._admission.admit(item)
            _admitted(span, ticket)
            return await self._embed(ticket, span)

    async def _embed(self, ticket: Ticket, span: Span | None = None) -> EmbeddingResult:
        if ticket.replay is not None:
            return ticket.replay
        try:
            dispatched = await self._orchestrator.embed.remote(tracing.handoff(ticket.item))
            ticket.ran_on(dispatched)
            result = dispatched.value
            vectors = None
            if ticket.key is not None:  # kept for replays: fetch it if it came by reference
                vectors = result.vectors
                if isinstance(vectors, ray.ObjectRef):
                    vectors = await vectors
        except BaseException as exc:
            await self._admission.fail(ticket, exc)
            raise
        _served(span, ticket, result.prompt_tokens, 0)
        await self._admission.succeed(ticket, result.prompt_tokens, 0, result, vectors)
        return result

    def _attributes(self, item: WorkItem) -> dict[str, Any]:
        model = self._config.model(item.model)
        return {
            tracing.MODEL: item.model,
            tracing.MODEL_VERSION: model.version if model is not None else None,
        }

    # --- the DLQ ------------------------------------------------------------------------

    async def replay_dead_letter(self, entry: DeadLetter | dict[str, Any]) -> dict[str, Any]:
        """Submit a dead letter again (``haif dlq replay``); trusted in-cluster callers only.

        Returns ``{"job_id", "executed", "state"}``: ``executed`` is False when the job had
        already been replayed (the stored answer of that execution stands).

        Raises: what the request raises: a ServiceError when it fails again (it is then
        dead-lettered again), InvalidRequest when the entry cannot be replayed.
        """
        from haif.gateway.replay import replay_item

        self._start_background()
        item, principal = await replay_item(self._config, self._db, entry)
        ticket = await self._admission.admit_trusted(item, principal)
        executed = ticket.replay is None
        if item.kind == "embedding":
            await self._embed(ticket)
        else:
            await self._generate(item, ticket)
        return {"job_id": ticket.job_id, "executed": executed, "state": "succeeded"}

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

    async def _probe_artifact_store(self) -> dict[str, str]:
        """Replica reachability, probed at most every ARTIFACT_PROBE_TTL_S and within a timeout."""
        now = time.monotonic()
        if self._artifact_probe is not None and now - self._artifact_probe[0] < ARTIFACT_PROBE_TTL_S:
            return self._artifact_probe[1]
        from haif.artifacts.store import ArtifactStore  # lazy: fsspec

        store = ArtifactStore.from_config(self._config.artifacts, self._config.base_path())
        try:
            result = await asyncio.wait_for(asyncio.to_thread(store.probe), ARTIFACT_PROBE_TIMEOUT_S)
        except TimeoutError:
            result = {r.label: f"no answer within {ARTIFACT_PROBE_TIMEOUT_S:g}s" for r in store.replicas}
        self._artifact_probe = (now, result)
        return result

    # --- introspection -------------------------------------------------------------------

    def limits(self) -> LimitsConfig:
        """The request limits, so that in-cluster clients build envelopes as the Bridge does."""
        return self._config.limits

    def stats(self) -> dict[str, Any]:
        """This replica's admission counters (GET /metrics has them merged over replicas)."""
        leases = self._leases
        return {
            "replica": _replica_id(),
            "outcomes": dict(self._admission.metrics.counts),
            "leases": None
            if leases is None
            else {"taken": leases.taken, "returned": leases.returned, "held": len(leases)},
        }

    async def status(self) -> dict[str, Any]:
        """Readiness. The metadata store down: not ready (requests would get 503). Redis down:
        ready, degraded (rate limits count in the store, the DLQ writes to its table), unless
        ``quotas.redis_unavailable`` is ``reject``."""
        status = await self._orchestrator.status.remote()
        if any(m.enabled and m.artifact for m in self._config.models):
            replicas = await self._probe_artifact_store()
            reachable = sum(v == "ok" for v in replicas.values())
            status["artifact_store"] = {"replicas": replicas, "reachable": reachable}
            if not reachable:  # reads fall back across replicas: one is enough to load models
                status["ready"] = False
        if self._db is not None:
            try:
                await self._db.run(self._db.ping)
                status["database"] = "ok"
            except HaifError as exc:
                status["database"] = exc.message
                status["ready"] = False
            if self._admission.settlements is not None:
                status["pending_settlements"] = len(self._admission.settlements)
        if self._config.redis.url and (self._limiter is not None or self._dlq is not None):
            status["redis"] = await self._redis_status()
            if status["redis"] != "ok" and self._config.quotas.redis_unavailable == "reject":
                status["ready"] = False
        return status

    async def _redis_status(self) -> str:
        from redis.exceptions import RedisError

        try:
            if self._limiter is not None:
                await self._limiter.ping()
            elif self._dlq is not None and self._db is not None:
                await self._db.run(self._dlq.ping)
            return "ok"
        except RedisError as exc:
            return f"unavailable ({type(exc).__name__}); degraded: the metadata store stands in"


def _admitted(span: Span, ticket: Ticket) -> None:
    principal = ticket.item.ctx.principal
    logger.debug("admitted %s on %s as job %s", ticket.item.kind, ticket.item.model, ticket.job_id)
    tenant = principal.tenant if principal is not None else None
    tracing.set_attributes({tracing.TENANT: tenant, "haif.job_id": ticket.job_id}, span)


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
