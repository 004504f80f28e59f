"""The Gateway: a Ray Serve deployment that admits requests and shapes the answers.

Admission (authentication, scope and model checks, limits) happens here for every
entry point (HTTP Bridge, in-cluster SDK, P2P shim), so that none can bypass it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from haif.exceptions import AuthenticationFailed, ModelNotFound, PermissionDenied, UnprocessableRequest
from haif.gateway.auth import Authenticator, StaticKeyAuthenticator
from haif.gateway.serving import StreamFormatter, chat_response, completion_response
from haif.protocol import ModelCard, ModelList, now

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig, LimitsConfig
    from haif.envelope import EmbeddingResult, Principal, RequestContext, WorkItem
    from haif.protocol import ChatCompletionChunk, CompletionChunk

logger = logging.getLogger("haif.gateway")


def default_authenticator(config: HaifConfig) -> Authenticator:
    if not config.auth.dev_api_key:
        raise AuthenticationFailed("no API key is configured (auth.dev_api_key)")
    return StaticKeyAuthenticator(config.auth.dev_api_key, config.auth.dev_tenant)


class Gateway:
    def __init__(self, config: HaifConfig, orchestrator: DeploymentHandle) -> None:
        self._config = config
        self._orchestrator = orchestrator
        self._stream_handle = orchestrator.options(stream=True)
        self._auth: Authenticator = default_authenticator(config)
        self._created = now()

    # --- admission -----------------------------------------------------------------------

    async def _principal(self, ctx: RequestContext) -> Principal:
        principal = await self._auth.authenticate(ctx.api_key)
        if "inference" not in principal.scopes:
            raise PermissionDenied("this API key may not run inference")
        return principal

    async def _admit(self, item: WorkItem) -> WorkItem:
        principal = await self._principal(item.ctx)
        if principal.allowed_models is not None and item.model not in principal.allowed_models:
            raise PermissionDenied(f"this API key may not use model {item.model!r}")
        limits = self._config.limits
        if item.max_tokens > limits.max_tokens:
            raise UnprocessableRequest(f"'max_tokens' is {item.max_tokens}; the limit is {limits.max_tokens}")
        if item.kind == "embedding" and item.n_inputs > limits.max_embedding_inputs:
            raise UnprocessableRequest(
                f"'input' has {item.n_inputs} items; the limit is {limits.max_embedding_inputs}"
            )
        item.ctx.remaining_s()
        return item.with_ctx(item.ctx.authenticated(principal))

    # --- endpoints -----------------------------------------------------------------------

    async def models(self, ctx: RequestContext) -> ModelList:
        principal = await self._principal(ctx)
        names = await self._orchestrator.models.remote()
        allowed = principal.allowed_models
        return ModelList(
            data=[ModelCard(id=n, created=self._created) for n in names if allowed is None or n in allowed]
        )

    async def model(self, name: str, ctx: RequestContext) -> ModelCard:
        listing = await self.models(ctx)
        for card in listing.data:
            if card.id == name:
                return card
        raise ModelNotFound(f"the model {name!r} does not exist")

    async def generate(self, item: WorkItem) -> Any:
        item = await self._admit(item)
        outputs = await self._orchestrator.generate.remote(item)
        if item.kind == "chat":
            return chat_response(item.model, outputs)
        return completion_response(item.model, outputs)

    async def stream(self, item: WorkItem) -> AsyncIterator[ChatCompletionChunk | CompletionChunk]:
        item = await self._admit(item)
        fmt = StreamFormatter(item.kind, item.model, item.include_usage)
        first = True
        async for event in self._stream_handle.stream.remote(item):
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
        usage = fmt.usage_chunk()
        if usage is not None:
            yield usage

    async def embed(self, item: WorkItem) -> EmbeddingResult:
        item = await self._admit(item)
        return await self._orchestrator.embed.remote(item)

    def limits(self) -> LimitsConfig:
        """The request limits, so that in-cluster clients build envelopes as the Bridge does."""
        return self._config.limits

    async def status(self) -> dict[str, Any]:
        return await self._orchestrator.status.remote()
