"""The Gateway: the Ray Serve deployment at HAIF's edge, and its HTTP ingress.

One Gateway replica takes a request from its entry point and carries it to the worker
itself (``haif.gateway.pipeline``): an HTTP request is parsed by the Bridge's FastAPI
app (the deployment's ``@serve.ingress``, built in ``__serve_build_asgi_app__``),
admitted, routed, dispatched straight to a worker actor and formatted in this process.
In-cluster callers (``haif.sdk``'s ``handle.remote()``) and the P2P shim call the
handle methods below, which run the same pipelines.

Errors are mapped once per boundary: HTTP in ``haif.bridge.errors``; here, for handle
calls, a ``HaifError`` is answered as a ``Refused`` value, not raised, so that Serve
does not log a refused request as an ERROR with a traceback (the SDK raises it on the
caller's side). Each refusal is one log line, INFO for a client error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from haif.envelope import Refused
from haif.exceptions import HaifError
from haif.gateway.compose import compose, replica_id
from haif.gateway.pipeline import Pipeline
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs

if TYPE_CHECKING:
    from datetime import datetime

    from fastapi import FastAPI
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig, LimitsConfig
    from haif.dlq import DeadLetter
    from haif.envelope import EmbeddingResult, RequestContext, WorkItem
    from haif.gateway.compose import GatewayParts
    from haif.protocol import ModelCard, ModelList

logger = logging.getLogger("haif.gateway")

T = TypeVar("T")


class Gateway:
    """A Gateway replica: the HTTP ingress and the handle API over one ``Pipeline``.

    Args:
        config: HAIF's config (prepared).
        orchestrator: the Orchestrator deployment's handle (the routing table's source).
        p2p: the P2P shim's handle when it runs (its state is reported by /readyz).
        parts: the collaborators, when a test builds them; else ``compose`` builds them.
    """

    def __init__(
        self,
        config: HaifConfig,
        orchestrator: DeploymentHandle | None = None,
        *,
        p2p: DeploymentHandle | None = None,
        parts: GatewayParts | None = None,
    ) -> None:
        tracing.setup_tracing(config.telemetry, "gateway", region=config.regions[0].name, instance=replica_id())
        install_json_logs(config.telemetry, "gateway")
        if parts is None:
            if orchestrator is None:
                raise TypeError("Gateway needs the Orchestrator's handle or its parts")
            parts = compose(config, orchestrator, p2p)
        self._config = config
        self.pipeline = pipeline = Pipeline(config, parts)
        if parts.metrics is not None:
            parts.metrics.registry.add_collector(lambda _registry: pipeline.record_routing_metrics())
        pipeline.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        from haif.bridge.app import build_app

        return build_app(self._config, self.pipeline, self.pipeline.parts.metrics)

    async def check_health(self) -> None:
        """Serve's periodic replica check; starts the background work if it has not yet."""
        self.pipeline.start()

    async def __del__(self) -> None:
        """Serve's graceful shutdown of the replica: the background work stops, and the
        quota leases give back what they did not hand out."""
        await self.pipeline.stop()

    # --- the handle API (haif.sdk, the P2P shim) -------------------------------------------

    async def models(self, ctx: RequestContext) -> ModelList | Refused:
        return await _answer(self.pipeline.models(ctx), ctx)

    async def model(self, name: str, ctx: RequestContext) -> ModelCard | Refused:
        return await _answer(self.pipeline.model(name, ctx), ctx)

    async def generate(self, item: WorkItem) -> Any:
        return await _answer(self.pipeline.generate(item), item.ctx)

    async def stream(self, item: WorkItem) -> AsyncIterator[Any]:
        try:
            async for chunk in self.pipeline.stream(item):
                yield chunk
        except HaifError as exc:
            _log_refusal(exc, item.ctx)
            yield Refused(exc)

    async def embed(self, item: WorkItem) -> EmbeddingResult | Refused:
        return await _answer(self.pipeline.embed(item), item.ctx)

    async def replay_dead_letter(self, entry: DeadLetter | dict[str, Any]) -> dict[str, Any] | Refused:
        """``haif dlq replay``: submit a dead letter again (see ``Pipeline.replay_dead_letter``)."""
        return await _answer(self.pipeline.replay_dead_letter(entry), None)

    async def job(self, job_id: str, ctx: RequestContext) -> dict[str, Any] | Refused:
        return await _answer(self.pipeline.job(job_id, ctx), ctx)

    async def jobs(self, ctx: RequestContext, limit: int) -> list[dict[str, Any]] | Refused:
        return await _answer(self.pipeline.jobs(ctx, limit), ctx)

    async def usage(self, ctx: RequestContext, since: datetime | None, limit: int) -> Any:
        return await _answer(self.pipeline.usage(ctx, since, limit), ctx)

    def limits(self) -> LimitsConfig:
        """The request limits, so that in-cluster clients build envelopes as HTTP does."""
        return self._config.limits

    def stats(self) -> dict[str, Any]:
        """This replica's admission counters and routing view (GET /metrics merges them)."""
        leases = self.pipeline.parts.leases
        return {
            "replica": replica_id(),
            "outcomes": dict(self.pipeline.admission.metrics.counts),
            "leases": None
            if leases is None
            else {"taken": leases.taken, "returned": leases.returned, "held": len(leases)},
            "routing": {name: r.status() for name, r in self.pipeline.router.models.items()},
            "table_version": self.pipeline.router.version,
        }

    async def status(self) -> dict[str, Any]:
        return await self.pipeline.status()


async def _answer(call: Awaitable[T], ctx: RequestContext | None) -> T | Refused:
    try:
        return await call
    except HaifError as exc:
        _log_refusal(exc, ctx)
        return Refused(exc)


def _log_refusal(exc: HaifError, ctx: RequestContext | None) -> None:
    request_id = ctx.request_id if ctx is not None else "-"
    logger.log(exc.log_level, "request %s: %d %s: %s", request_id, exc.status_code, exc.code, exc.message)
