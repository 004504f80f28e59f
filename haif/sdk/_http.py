"""HTTP client for outside the cluster; returns the same pydantic models as ``HandleClient``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from haif import exceptions as errors
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
)

DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)

# The most specific HAIF error for each (status, code) the server sends.
_BY_CODE: dict[str, type[errors.HaifError]] = {
    cls.code: cls
    for cls in (
        errors.ModelNotFound,
        errors.PromptTooLong,
        errors.UnsupportedOperation,
        errors.UnsupportedParameter,
        errors.ModelNotReady,
        errors.WorkerUnavailable,
        errors.Overloaded,
        errors.GpuUnavailable,
        errors.ModelLoadFailed,
        errors.PayloadTooLarge,
        errors.AuthenticationFailed,
        errors.DeadlineExceeded,
        errors.RateLimited,
        errors.QuotaExceeded,
        errors.StoreUnavailable,
        errors.InternalError,
    )
}
_BY_STATUS: dict[int, type[errors.HaifError]] = {
    400: errors.InvalidRequest,
    401: errors.AuthenticationFailed,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.UnprocessableRequest,
    429: errors.RateLimited,
    503: errors.ServiceError,
    504: errors.DeadlineExceeded,
}


def error_from(status: int, body: Any) -> errors.HaifError:
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {}
    message = str(detail.get("message") or f"HTTP {status}")
    cls = _BY_CODE.get(str(detail.get("code"))) or _BY_STATUS.get(status, errors.InternalError)
    return cls(message)


class HttpClient:
    """A small typed client for HAIF's OpenAI-compatible HTTP API.

    Example::

        with HttpClient("http://127.0.0.1:8000", api_key) as client:
            reply = client.chat({"model": "tiny-llama", "messages": [...]})
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: Any) -> Any:
        resp = self._http.post(path, content=body.model_dump_json(exclude_none=True),
                               headers={"content-type": "application/json"})
        return self._json(resp)

    @staticmethod
    def _json(resp: httpx.Response) -> Any:
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            raise error_from(resp.status_code, data)
        return data

    def models(self) -> ModelList:
        return ModelList.model_validate(self._json(self._http.get("/v1/models")))

    def completions(self, request: CompletionRequest | dict[str, Any]) -> CompletionResponse:
        body = CompletionRequest.model_validate(request)
        return CompletionResponse.model_validate(self._post("/v1/completions", body))

    def chat(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        body = ChatCompletionRequest.model_validate(request)
        return ChatCompletionResponse.model_validate(self._post("/v1/chat/completions", body))

    def embeddings(self, request: EmbeddingRequest | dict[str, Any]) -> EmbeddingResponse:
        body = EmbeddingRequest.model_validate(request)
        return EmbeddingResponse.model_validate(self._post("/v1/embeddings", body))

    def chat_stream(self, request: ChatCompletionRequest | dict[str, Any]) -> Iterator[ChatCompletionChunk]:
        body = ChatCompletionRequest.model_validate(request).model_copy(update={"stream": True})
        for data in self._stream("/v1/chat/completions", body):
            yield ChatCompletionChunk.model_validate(data)

    def completions_stream(self, request: CompletionRequest | dict[str, Any]) -> Iterator[CompletionChunk]:
        body = CompletionRequest.model_validate(request).model_copy(update={"stream": True})
        for data in self._stream("/v1/completions", body):
            yield CompletionChunk.model_validate(data)

    def _stream(self, path: str, body: Any) -> Iterator[Any]:
        with self._http.stream(
            "POST", path, content=body.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json"},
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._json(resp)
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                data = json.loads(payload)
                if "error" in data:
                    raise error_from(500, data)
                yield data
