"""In-cluster client: talks to the Gateway deployment through a Serve handle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from haif.envelope import RequestContext, build_work_item
from haif.handles import answer, typed
from haif.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    embedding_response,
)
from haif.telemetry.tracing import traceparent_of

if TYPE_CHECKING:
    from haif.config import LimitsConfig
    from haif.envelope import Body, Kind, WorkItem

DEFAULT_TIMEOUT_S = 120.0


def _raise_typed(exc: BaseException) -> None:
    err = typed(exc)
    if err is exc:
        raise exc
    raise err from None


_value = answer


class HandleClient:
    """Calls HAIF from inside the Ray cluster with ``handle.remote()``; no HTTP involved.

    Requests go through the same Gateway admission as HTTP ones (API key, limits), and
    come back as the same pydantic models as the HTTP API's. Large bodies cross into
    the cluster's object store once, by reference.

    Example::

        client = HandleClient(api_key)
        reply = client.chat({"model": "tiny-llama", "messages": [...]})
    """

    def __init__(
        self,
        api_key: str,
        *,
        app_name: str = "haif",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        gateway: Any | None = None,
    ) -> None:
        from ray import serve

        self._api_key = api_key
        self._timeout_s = timeout_s
        self._gateway = gateway or serve.get_deployment_handle("Gateway", app_name=app_name)
        self._stream_gateway = self._gateway.options(stream=True)
        self._limits: LimitsConfig | None = None

    # --- plumbing ---------------------------------------------------------------------

    def _ctx(self) -> RequestContext:
        # A caller that traces makes its current span the parent of the request's spans.
        return RequestContext.new(
            timeout_s=self._timeout_s, api_key=self._api_key, traceparent=traceparent_of()
        )

    def _item(self, kind: Kind, body: Body, limits: LimitsConfig) -> WorkItem:
        import ray

        return build_work_item(kind, body, self._ctx(), limits, put=ray.put)

    def _limits_sync(self) -> LimitsConfig:
        if self._limits is None:
            self._limits = self._gateway.limits.remote().result(timeout_s=self._timeout_s)
        return self._limits

    async def _limits_async(self) -> LimitsConfig:
        if self._limits is None:
            self._limits = await self._gateway.limits.remote()
        return self._limits

    # --- synchronous API ------------------------------------------------------------------

    def models(self) -> ModelList:
        try:
            reply = self._gateway.models.remote(self._ctx()).result(timeout_s=self._timeout_s)
        except Exception as exc:
            _raise_typed(exc)
            raise
        return _value(reply)

    def completions(self, request: CompletionRequest | dict[str, Any]) -> CompletionResponse:
        body = CompletionRequest.model_validate(request)
        return self._generate("completion", body)

    def chat(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        body = ChatCompletionRequest.model_validate(request)
        return self._generate("chat", body)

    def chat_stream(self, request: ChatCompletionRequest | dict[str, Any]) -> Iterator[ChatCompletionChunk]:
        body = ChatCompletionRequest.model_validate(request).model_copy(update={"stream": True})
        return self._stream_sync("chat", body)

    def completions_stream(self, request: CompletionRequest | dict[str, Any]) -> Iterator[CompletionChunk]:
        body = CompletionRequest.model_validate(request).model_copy(update={"stream": True})
        return self._stream_sync("completion", body)

    def embeddings(self, request: EmbeddingRequest | dict[str, Any]) -> EmbeddingResponse:
        import ray

        body = EmbeddingRequest.model_validate(request)
        item = self._item("embedding", body, self._limits_sync())
        try:
            result = _value(self._gateway.embed.remote(item).result(timeout_s=self._timeout_s))
            vectors = ray.get(result.vectors) if isinstance(result.vectors, ray.ObjectRef) else result.vectors
        except Exception as exc:
            _raise_typed(exc)
            raise
        return embedding_response(result.model, result.prompt_tokens, vectors, body.encoding_format)

    def _generate(self, kind: Kind, body: Body) -> Any:
        item = self._item(kind, body, self._limits_sync())
        if item.stream:
            raise ValueError("use chat_stream / completions_stream for stream=True")
        try:
            reply = self._gateway.generate.remote(item).result(timeout_s=self._timeout_s)
        except Exception as exc:
            _raise_typed(exc)
            raise
        return _value(reply)

    def _stream_sync(self, kind: Kind, body: Body) -> Iterator[Any]:
        item = self._item(kind, body, self._limits_sync())
        gen = self._stream_gateway.stream.remote(item)
        try:
            for chunk in gen:
                yield _value(chunk)
        except Exception as exc:
            _raise_typed(exc)
            raise
        finally:
            gen.cancel()

    # --- asynchronous API -----------------------------------------------------------------

    async def achat(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        body = ChatCompletionRequest.model_validate(request)
        return await self._agenerate("chat", body)

    async def acompletions(self, request: CompletionRequest | dict[str, Any]) -> CompletionResponse:
        body = CompletionRequest.model_validate(request)
        return await self._agenerate("completion", body)

    async def achat_stream(
        self, request: ChatCompletionRequest | dict[str, Any]
    ) -> AsyncIterator[ChatCompletionChunk]:
        body = ChatCompletionRequest.model_validate(request).model_copy(update={"stream": True})
        item = self._item("chat", body, await self._limits_async())
        gen = self._stream_gateway.stream.remote(item)
        try:
            async for chunk in gen:
                yield _value(chunk)
        except Exception as exc:
            _raise_typed(exc)
            raise
        finally:
            gen.cancel()

    async def aembeddings(self, request: EmbeddingRequest | dict[str, Any]) -> EmbeddingResponse:
        import ray

        body = EmbeddingRequest.model_validate(request)
        item = self._item("embedding", body, await self._limits_async())
        try:
            result = _value(await self._gateway.embed.remote(item))
            vectors = await result.vectors if isinstance(result.vectors, ray.ObjectRef) else result.vectors
        except Exception as exc:
            _raise_typed(exc)
            raise
        return embedding_response(result.model, result.prompt_tokens, vectors, body.encoding_format)

    async def _agenerate(self, kind: Kind, body: Body) -> Any:
        item = self._item(kind, body, await self._limits_async())
        try:
            reply = await self._gateway.generate.remote(item)
        except Exception as exc:
            _raise_typed(exc)
            raise
        return _value(reply)
