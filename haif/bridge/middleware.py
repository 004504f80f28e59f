"""ASGI middleware of the Bridge: request ids, the request's server span, the body-size
limit, request metrics.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that streaming responses and
client disconnects pass through untouched. The span of an API request (``/v1/...``)
covers the whole exchange, the streamed body included; it is the child of the client's
``traceparent`` and the parent of every span the request causes downstream.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

from haif.envelope import request_id_from, traceparent_from
from haif.exceptions import PayloadTooLarge
from haif.telemetry import logs, tracing

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from haif.telemetry.metrics import BridgeMetrics

logger = logging.getLogger("haif.bridge")

REQUEST_ID_HEADER = b"x-request-id"
TRACEPARENT_HEADER = b"traceparent"
TRACED_PREFIX = "/v1/"  # health probes and metrics scrapes make no traces


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI re-raises HTTPExceptions from body parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds the limit of {limit} bytes")


class EdgeMiddleware:
    """Assigns/echoes ``X-Request-ID`` and answers 413 to bodies over ``max_body_bytes``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id, echo = _request_id(scope, headers)
        scope.setdefault("state", {})["request_id"] = request_id
        path = _app_path(scope)
        if not path.startswith(TRACED_PREFIX):
            previous = logs.bind(request_id)
            try:
                await self._edge(scope, receive, send, headers, request_id, echo)
            finally:
                logs.restore(previous)
            return
        raw_parent = headers.get(TRACEPARENT_HEADER)
        method = scope.get("method", "")
        with tracing.entry_span(
            f"{method} {path}",
            traceparent_from(raw_parent.decode("latin-1") if raw_parent is not None else None),
            request_id,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:  # 4xx are the client's (OpenTelemetry HTTP conventions)
                        tracing.set_error(span, f"HTTP {status}")
                await send(message)

            await self._edge(scope, receive, traced_send, headers, request_id, echo)
            route = scope.get("route")
            if route is not None and getattr(route, "path", None):
                span.set_attribute("http.route", route.path)
                span.update_name(f"{method} {route.path}")
            logger.debug("%s %s answered", method, path)

    async def _edge(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        request_id: str,
        echo: bool,
    ) -> None:
        id_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if echo and message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_body_bytes
            except ValueError:
                too_large = False  # the server rejects a malformed length itself
            if too_large:
                await self._reject(send_with_id)
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send_with_id(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send_with_id)

    async def _reject(self, send: Send) -> None:
        err = PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
        body = json.dumps(err.to_body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _request_id(scope: Scope, headers: dict[bytes, bytes]) -> tuple[str, bool]:
    """The request's id and whether this middleware must echo it.

    A client id that is too long or has unsafe characters (``request_id_from``) is treated
    like a missing one: a fresh id replaces it on the request's headers, so that nothing
    downstream reads the client's value, and it is echoed. A well-formed client id is
    not echoed here: under Ray Serve the proxy has put it on the request and echoes it
    itself (and when the client sent none, the proxy's own id arrives here as the
    client's). The proxy echoes what the client sent, whatever it was: behind it, a
    replaced id comes back beside the client's.
    """
    raw = headers.get(REQUEST_ID_HEADER)
    sent = raw.decode("latin-1") if raw is not None else None
    request_id = request_id_from(sent)
    if request_id == sent:
        return request_id, False
    if raw is not None:
        logger.debug("X-Request-ID of %d characters replaced by %s", len(raw), request_id)
        fresh = request_id.encode("ascii")
        scope["headers"] = [
            (k, fresh if k == REQUEST_ID_HEADER else v) for k, v in scope.get("headers") or []
        ]
        headers[REQUEST_ID_HEADER] = fresh
    return request_id, True


UNMATCHED_ROUTE = "other"


class MetricsMiddleware:
    """Counts every HTTP request by route, model and status, and times it to its last byte.

    The route is the matched template (``/v1/models/{model_id:path}``), never the raw
    path, and the model is what the service recorded in ``request.state.model``, so
    label values stay bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp, metrics: BridgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            model = (scope.get("state") or {}).get("model")
            self.metrics.http(route, model, status, time.perf_counter() - started)


def _app_path(scope: Scope) -> str:
    """The request's path within the app (without the route prefix it is mounted at)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
