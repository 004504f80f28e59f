"""Peers' requests into the Gateway: the P2P shim's ``InboundHandler``.

A value is the HTTP API's request body; what HTTP carries in headers rides in its
optional top-level ``haif`` object (DESIGN.md §3 "P2P")::

    {"idempotency_key": str, "traceparent": str, "request_id": str, "timeout_s": number}

Each request becomes the same envelope as an HTTP request's, with the caller's Noise
public key in place of an API key, and runs the Gateway's pipeline through its handle:
the same admission (the key → tenant, quotas, usage records, job rows, the DLQ) and one
trace. The answer is the HTTP API's response body; a stream is its chunks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from haif.envelope import RequestContext, build_work_item
from haif.exceptions import InvalidRequest, PayloadTooLarge, UnprocessableRequest
from haif.handles import answer, typed
from haif.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    embedding_response,
    validation_message,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig, LimitsConfig
    from haif.envelope import Kind, WorkItem

logger = logging.getLogger("haif.p2p")

ENVELOPE_FIELD = "haif"
ENVELOPE_KEYS = frozenset({"idempotency_key", "traceparent", "request_id", "timeout_s", "token"})
MAX_ENVELOPE_STRING_CHARS = 512
# ``haif.token``: a HAIF key or a JWT of an issuer in auth.oidc; the caller is then who the
# token names, not the tenant its Noise key is mapped to.
MAX_TOKEN_CHARS = 8 * 1024

_BODIES: dict[str, tuple[Kind, type[Any]]] = {
    "haif.completions": ("completion", CompletionRequest),
    "haif.chat": ("chat", ChatCompletionRequest),
    "haif.embeddings": ("embedding", EmbeddingRequest),
}


class GatewayInbound:
    """Answers peers' requests through the Gateway deployment's handle."""

    def __init__(self, config: HaifConfig, gateway: DeploymentHandle) -> None:
        self._config = config
        self._gateway = gateway
        self._stream_gateway = gateway.options(stream=True)
        self._limits: LimitsConfig | None = None

    async def __call__(self, method: str, peer: str, value: dict[str, Any]) -> Any:
        body = dict(value)
        ctx = self._context(peer, body.pop(ENVELOPE_FIELD, None))
        if method == "haif.models":
            listing = await self._call(self._gateway.models.remote(ctx))
            return listing.model_dump(mode="json")
        if method not in _BODIES:
            raise InvalidRequest(f"unknown method {method!r}")
        kind, model = _BODIES[method]
        try:
            request = model.model_validate(body)
        except ValidationError as exc:
            message, status = validation_message(list(exc.errors()))
            raise (InvalidRequest if status == 400 else UnprocessableRequest)(message) from None
        import ray

        limits = await self._request_limits()
        item = build_work_item(kind, request, ctx, limits, put=ray.put)
        if item.payload_bytes > limits.max_body_bytes:  # as HTTP's body limit (413 there)
            raise PayloadTooLarge(f"the request's text exceeds the limit of {limits.max_body_bytes} bytes")
        if kind == "embedding":
            result = await self._call(self._gateway.embed.remote(item))
            vectors = result.vectors
            if isinstance(vectors, ray.ObjectRef):
                vectors = await vectors
            return embedding_response(result.model, result.prompt_tokens, vectors, request.encoding_format).model_dump(mode="json")
        if item.stream:
            return self._stream(item)
        response = await self._call(self._gateway.generate.remote(item))
        return response.model_dump(mode="json")

    async def _stream(self, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        gen = self._stream_gateway.stream.remote(item)
        try:
            async for chunk in gen:
                yield answer(chunk).model_dump(mode="json")
        except Exception as exc:
            raise typed(exc) from None
        finally:
            gen.cancel()  # the peer went away (or it failed): stop the generation

    async def _call(self, response: Any) -> Any:
        try:
            reply = await response
        except asyncio.CancelledError:
            # The peer went away or its deadline passed: awaiting a Serve response and
            # being cancelled leaves the request running, so stop it too.
            response.cancel()
            raise
        except Exception as exc:
            raise typed(exc) from None
        return answer(reply)

    async def _request_limits(self) -> LimitsConfig:
        if self._limits is None:
            self._limits = answer(await self._gateway.limits.remote())
        return self._limits

    def _context(self, peer: str, envelope: Any) -> RequestContext:
        """The request's context; raises InvalidRequest for a malformed ``haif`` object."""
        if envelope is None:
            envelope = {}
        if not isinstance(envelope, dict):
            raise InvalidRequest(f"'{ENVELOPE_FIELD}' must be an object")
        unknown = sorted(set(envelope) - ENVELOPE_KEYS)
        if unknown:
            raise InvalidRequest(f"'{ENVELOPE_FIELD}' has unknown fields: {', '.join(unknown)[:200]}")
        strings = {k: envelope.get(k) for k in ("idempotency_key", "traceparent", "request_id")}
        for key, text in strings.items():
            if text is not None and (not isinstance(text, str) or len(text) > MAX_ENVELOPE_STRING_CHARS):
                raise InvalidRequest(f"'{ENVELOPE_FIELD}.{key}' must be a string of at most "
                                     f"{MAX_ENVELOPE_STRING_CHARS} characters")
        server, timeout = self._config.server, envelope.get("timeout_s")
        # The sidecar answers TIMEOUT at p2p.request_timeout_s: no deadline goes beyond it.
        longest = min(server.max_request_timeout_s, self._config.p2p.request_timeout_s)
        timeout_s = min(server.request_timeout_s, longest)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                server.min_request_timeout_s <= timeout <= longest
            ):
                raise InvalidRequest(
                    f"'{ENVELOPE_FIELD}.timeout_s' must be a number of seconds between "
                    f"{server.min_request_timeout_s:g} and {longest:g}"
                )
            timeout_s = float(timeout)
        token = envelope.get("token")
        if token is not None and (not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS):
            raise InvalidRequest(f"'{ENVELOPE_FIELD}.token' must be a string of at most {MAX_TOKEN_CHARS} characters")
        return RequestContext.new(
            timeout_s=timeout_s,
            api_key=token,
            request_id=strings["request_id"],
            traceparent=strings["traceparent"],
            idempotency_key=strings["idempotency_key"],
            peer_key=peer,
        )

