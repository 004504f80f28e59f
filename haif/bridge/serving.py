"""The Bridge's request logic: build the envelope, run the Gateway's pipeline, write HTTP/SSE."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from haif.bridge.errors import as_haif_error
from haif.envelope import TIMEOUT_HEADER, RequestContext, build_work_item, timeout_from
from haif.exceptions import HaifError, InvalidRequest, MetricsUnavailable
from haif.protocol import JobList, JobRecord, UsageList, embedding_response
from haif.telemetry.metrics import CONTENT_TYPE
from haif.telemetry.tracing import traceparent_of

if TYPE_CHECKING:
    from datetime import datetime

    from fastapi import Request

    from haif.config import HaifConfig
    from haif.envelope import Body, EmbeddingResult, Kind
    from haif.gateway.pipeline import Pipeline
    from haif.protocol import EmbeddingRequest
    from haif.telemetry.metrics import BridgeMetrics, MetricsReader

logger = logging.getLogger("haif.bridge")

SSE_DONE = b"data: [DONE]\n\n"
IDEMPOTENCY_HEADER = "idempotency-key"
MODEL_VERSION_HEADER = "X-HAIF-Model-Version"


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
    """What the routers call: builds the envelope and runs the Gateway's pipeline in this
    process (the Bridge is the Gateway replica's HTTP adapter, not a hop of its own)."""

    def __init__(
        self,
        config: HaifConfig,
        pipeline: Pipeline,
        metrics: BridgeMetrics,
        metrics_reader: MetricsReader,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
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
        listing = await self.pipeline.models(self.context(request))
        return Response(listing.model_dump_json(), media_type="application/json")

    async def model(self, name: str, request: Request) -> Response:
        card = await self.pipeline.model(name, self.context(request))
        return Response(card.model_dump_json(), media_type="application/json")

    async def generate(self, kind: Kind, body: Body, request: Request) -> Response:
        started = time.perf_counter()
        item = self._item(kind, body, request)
        if item.stream:
            return await self._stream(item, started)
        result = await self.pipeline.generate(item)
        return Response(
            result.model_dump_json(), media_type="application/json", headers=_version_header(result)
        )

    async def _stream(self, item: Any, started: float) -> Response:
        gen = self.pipeline.stream(item)
        try:
            # Pull the first chunk before answering, so that errors that happen before
            # any token (unknown model, bad key, prompt too long) are plain HTTP errors.
            first = await anext(gen, None)
        except BaseException:
            await gen.aclose()
            raise
        return StreamingResponse(
            _sse_body(
                gen, first, item.ctx.request_id, _StreamTimer(self.metrics, item.model, started),
                item.include_usage, item.n_choices,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_version_header(first)},
        )

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        item = self._item("embedding", body, request)
        result = await self.pipeline.embed(item)
        vectors = await resolve_vectors(result)
        response = embedding_response(result.model, result.prompt_tokens, vectors, body.encoding_format)
        return Response(response.model_dump_json(), media_type="application/json")

    async def job(self, job_id: str, request: Request) -> Response:
        found = await self.pipeline.job(job_id, self.context(request))
        return Response(JobRecord.model_validate(found).model_dump_json(), media_type="application/json")

    async def jobs(self, limit: int, request: Request) -> Response:
        found = await self.pipeline.jobs(self.context(request), limit)
        return Response(JobList(data=found).model_dump_json(), media_type="application/json")

    async def usage(self, since: datetime | None, limit: int, request: Request) -> Response:
        found = await self.pipeline.usage(self.context(request), utc(since), limit)
        return Response(UsageList(data=found).model_dump_json(), media_type="application/json")

    async def ready(self) -> JSONResponse:
        try:
            status = await self.pipeline.status()
        except HaifError as exc:
            return JSONResponse({"ready": False, "error": exc.message}, status_code=503)
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    async def metrics_text(self) -> Response:
        """The platform's metrics (every process, merged) in Prometheus text; 503 without."""
        try:
            body = await self._metrics_reader.render()
        except MetricsUnavailable as exc:
            return PlainTextResponse(exc.message + "\n", status_code=exc.status_code)
        return Response(body, media_type=CONTENT_TYPE)


def _version_header(response: Any) -> dict[str, str]:
    """``X-HAIF-Model-Version``: the ``system_fingerprint`` ("<model>:<version>") of the
    version that served the response (a stream's: its first chunk's)."""
    fingerprint = getattr(response, "system_fingerprint", None)
    return {MODEL_VERSION_HEADER: fingerprint} if fingerprint else {}


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
    gen: AsyncIterator[Any], first: Any, request_id: str, timer: _StreamTimer, include_usage: bool,
    n_choices: int = 1,
) -> AsyncIterator[bytes]:
    pending = b""  # events held back to leave with the next write
    open_choices = set(range(n_choices))  # choices whose finish reason has not come yet
    whole = False
    try:
        try:
            chunk = first
            while chunk is not None:
                timer.chunk()
                pending += sse(chunk.model_dump_json().encode())
                whole = whole or _finishes(chunk, open_choices)
                if (chunk.usage is not None) if include_usage else whole:
                    # The answer is whole (and its usage sent): the client gets its end
                    # now; the end of the worker's stream is read below, after it.
                    break
                if not (include_usage and whole):  # else its usage follows at once
                    yield pending
                    pending = b""
                chunk = await anext(gen, None)
        except Exception as exc:
            # Headers are sent: the error travels as a final SSE event in OpenAI's shape.
            err = as_haif_error(exc)
            logger.log(err.log_level, "stream %s failed: %s", request_id, err.message)
            pending += sse(json.dumps(err.to_body()).encode())
            whole = False
        yield pending + SSE_DONE
        if whole:
            async for _ in gen:  # the end of the worker's stream: the call ends, not cancelled
                logger.warning("stream %s: a chunk after its last one was dropped", request_id)
    finally:
        await gen.aclose()  # the client went away (or it failed): stop the generation


def _finishes(chunk: Any, open_choices: set[int]) -> bool:
    """Take the choices whose finish reason ``chunk`` carries off ``open_choices``; whether
    it finished the last of them (its text is the answer's last)."""
    done = {c.index for c in chunk.choices if c.finish_reason is not None}
    if not done:
        return False
    open_choices.difference_update(done)
    return not open_choices
