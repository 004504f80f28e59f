"""The Bridge's request logic: build the envelope, call the Gateway, write HTTP/SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from haif.bridge.errors import as_haif_error
from haif.envelope import TIMEOUT_HEADER, RequestContext, build_work_item, timeout_from
from haif.exceptions import InvalidRequest, MetricsUnavailable
from haif.handles import transported
from haif.gateway.serving import embedding_response
from haif.protocol import JobList, JobRecord, UsageList
from haif.telemetry.metrics import CONTENT_TYPE
from haif.telemetry.tracing import traceparent_of

if TYPE_CHECKING:
    from datetime import datetime

    from fastapi import Request
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig
    from haif.envelope import Body, EmbeddingResult, Kind
    from haif.protocol import EmbeddingRequest
    from haif.telemetry.metrics import BridgeMetrics, MetricsReader

logger = logging.getLogger("haif.bridge")

SSE_DONE = b"data: [DONE]\n\n"
IDEMPOTENCY_HEADER = "idempotency-key"


def api_key_from(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def resolve_vectors(result: EmbeddingResult) -> Any:
    """The embedding array, fetched from the object store when it came by reference."""
    vectors = result.vectors
    if isinstance(vectors, ray.ObjectRef):
        vectors = await vectors
    return vectors


def utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC (a time without a zone is taken as UTC).

    Raises:
        InvalidRequest: the time cannot be expressed in UTC (out of range).
    """
    if value is None:
        return None
    from datetime import UTC

    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidRequest("'since' is out of range") from None


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class BridgeService:
    """What the routers call; holds the Gateway handles and the config."""

    def __init__(
        self,
        config: HaifConfig,
        gateway: DeploymentHandle,
        metrics: BridgeMetrics,
        metrics_reader: MetricsReader,
    ) -> None:
        self.config = config
        self.gateway = gateway = transported(gateway, config)
        self.stream_gateway = gateway.options(stream=True)
        self.metrics = metrics
        self._metrics_reader = metrics_reader

    def context(self, request: Request) -> RequestContext:
        server = self.config.server
        return RequestContext.new(
            timeout_s=timeout_from(
                request.headers.get(TIMEOUT_HEADER),
                server.request_timeout_s,
                server.min_request_timeout_s,
                server.max_request_timeout_s,
            ),
            api_key=api_key_from(request),
            request_id=request.state.request_id,
            # The request's server span (EdgeMiddleware) is the parent of what follows.
            traceparent=traceparent_of() or request.headers.get("traceparent"),
            idempotency_key=request.headers.get(IDEMPOTENCY_HEADER),
        )

    def _item(self, kind: Kind, body: Body, request: Request) -> Any:
        request.state.model = body.model  # the metrics middleware labels the request with it
        return build_work_item(kind, body, self.context(request), self.config.limits, put=ray.put)

    async def models(self, request: Request) -> Response:
        try:
            listing = await self.gateway.models.remote(self.context(request))
        except Exception as exc:
            raise as_haif_error(exc) from None
        return Response(listing.model_dump_json(), media_type="application/json")

    async def model(self, name: str, request: Request) -> Response:
        try:
            card = await self.gateway.model.remote(name, self.context(request))
        except Exception as exc:
            raise as_haif_error(exc) from None
        return Response(card.model_dump_json(), media_type="application/json")

    async def generate(self, kind: Kind, body: Body, request: Request) -> Response:
        started = time.perf_counter()
        item = self._item(kind, body, request)
        if item.stream:
            return await self._stream(item, started)
        try:
            result = await self.gateway.generate.remote(item)
        except Exception as exc:
            raise as_haif_error(exc) from None
        return Response(result.model_dump_json(), media_type="application/json")

    async def _stream(self, item: Any, started: float) -> Response:
        gen = self.stream_gateway.stream.remote(item)
        try:
            # Pull the first chunk before answering, so that errors that happen before
            # any token (unknown model, bad key, prompt too long) are plain HTTP errors.
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            raise as_haif_error(exc) from None
        return StreamingResponse(
            _sse_body(
                gen, first, item.ctx.request_id, _StreamTimer(self.metrics, item.model, started),
                item.include_usage, item.n_choices,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        item = self._item("embedding", body, request)
        try:
            result = await self.gateway.embed.remote(item)
            vectors = await resolve_vectors(result)
        except Exception as exc:
            raise as_haif_error(exc) from None
        response = embedding_response(result, vectors, body.encoding_format)
        return Response(response.model_dump_json(), media_type="application/json")

    async def job(self, job_id: str, request: Request) -> Response:
        try:
            found = await self.gateway.job.remote(job_id, self.context(request))
        except Exception as exc:
            raise as_haif_error(exc) from None
        return Response(JobRecord.model_validate(found).model_dump_json(), media_type="application/json")

    async def jobs(self, limit: int, request: Request) -> Response:
        try:
            found = await self.gateway.jobs.remote(self.context(request), limit)
        except Exception as exc:
            raise as_haif_error(exc) from None
        return Response(JobList(data=found).model_dump_json(), media_type="application/json")

    async def usage(self, since: datetime | None, limit: int, request: Request) -> Response:
        since = utc(since)
        try:
            found = await self.gateway.usage.remote(self.context(request), since, limit)
        except Exception as exc:
            raise as_haif_error(exc) from None
        return Response(UsageList(data=found).model_dump_json(), media_type="application/json")

    async def ready(self) -> JSONResponse:
        try:
            status = await self.gateway.status.remote()
        except Exception as exc:
            err = as_haif_error(exc)
            return JSONResponse({"ready": False, "error": err.message}, status_code=503)
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    async def metrics_text(self) -> Response:
        """The platform's metrics (every process, merged) in Prometheus text; 503 without."""
        try:
            body = await self._metrics_reader.render()
        except MetricsUnavailable as exc:
            return PlainTextResponse(exc.message + "\n", status_code=exc.status_code)
        return Response(body, media_type=CONTENT_TYPE)


class _StreamTimer:
    """Time to the first chunk and between chunks of one stream, as the client sees them."""

    def __init__(self, metrics: BridgeMetrics, model: str, started: float) -> None:
        self._metrics = metrics
        self._model = model
        self._last = started
        self._first = True

    def chunk(self) -> None:
        now = time.perf_counter()
        if self._first:
            self._first = False
            self._metrics.first_token(self._model, now - self._last)
        else:
            self._metrics.inter_token(self._model, now - self._last)
        self._last = now


async def _sse_body(
    gen: Any, first: Any, request_id: str, timer: _StreamTimer, include_usage: bool, n_choices: int = 1
) -> AsyncIterator[bytes]:
    finished = False
    pending = b""  # events held back to leave with the next write
    open_choices = set(range(n_choices))  # choices whose finish reason has not come yet
    try:
        chunk = first
        while chunk is not None:
            timer.chunk()
            pending += sse(chunk.model_dump_json().encode())
            whole = _finishes(chunk, open_choices)
            if (chunk.usage is not None) if include_usage else whole:
                # The answer is whole (and its usage sent): the client gets its end now,
                # while the end of the stream comes back through the hops behind it.
                _drain(gen, request_id)
                break
            if not (include_usage and whole):  # else its usage follows at once
                yield pending
                pending = b""
            chunk = await anext(gen, None)
        finished = True
    except Exception as exc:
        # Headers are sent: the error travels as a final SSE event in OpenAI's shape.
        err = as_haif_error(exc)
        logger.warning("stream %s failed: %s", request_id, err.message)
        pending += sse(json.dumps(err.to_body()).encode())
        finished = True
    finally:
        if not finished:
            gen.cancel()  # the client went away: stop the generation downstream
    yield pending + SSE_DONE


def _finishes(chunk: Any, open_choices: set[int]) -> bool:
    """Take the choices whose finish reason ``chunk`` carries off ``open_choices``; whether
    it finished the last of them (its text is the answer's last)."""
    done = {c.index for c in chunk.choices if c.finish_reason is not None}
    if not done:
        return False
    open_choices.difference_update(done)
    return not open_choices


_draining: set[asyncio.Task[None]] = set()


def _drain(gen: Any, request_id: str) -> None:
    """Read what is left of a stream whose answer is complete (its end, coming back
    through the hops) in the background: the call ends as it should, not cancelled."""

    async def rest() -> None:
        try:
            async for _ in gen:
                logger.warning("stream %s: a chunk after its last one was dropped", request_id)
        except Exception as exc:
            logger.debug("stream %s ended with %s after its answer", request_id, type(exc).__name__)

    task = asyncio.ensure_future(rest())
    _draining.add(task)
    task.add_done_callback(_draining.discard)
