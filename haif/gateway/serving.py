"""Turns worker outputs into OpenAI responses and stream chunks."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np

from haif.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Embedding,
    EmbeddingResponse,
    EmbeddingUsage,
    Usage,
    new_id,
    now,
)

if TYPE_CHECKING:
    from haif.envelope import EmbeddingResult
    from haif.runtimes.base import GenerationOutput, StreamEvent


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_response(
    model: str, outputs: list[GenerationOutput], response_id: str | None = None
) -> CompletionResponse:
    """The /v1/completions body; its id is the job's id when the request has a job."""
    return CompletionResponse(
        id=response_id or new_id("cmpl"),
        created=now(),
        model=model,
        choices=[
            CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
            for i, o in enumerate(outputs)
        ],
        usage=_usage(sum(o.prompt_tokens for o in outputs), sum(o.completion_tokens for o in outputs)),
    )


def chat_response(
    model: str, outputs: list[GenerationOutput], response_id: str | None = None
) -> ChatCompletionResponse:
    (out,) = outputs
    return ChatCompletionResponse(
        id=response_id or new_id("chatcmpl"),
        created=now(),
        model=model,
        choices=[
            ChatChoice(index=0, message=ChatMessageOut(content=out.text), finish_reason=out.finish_reason)
        ],
        usage=_usage(out.prompt_tokens, out.completion_tokens),
    )


class StreamFormatter:
    """Builds the chunks of one streamed response, OpenAI style."""

    def __init__(
        self, kind: str, model: str, include_usage: bool, response_id: str | None = None
    ) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = response_id or new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def first(self) -> ChatCompletionChunk | None:
        if self.kind != "chat":
            return None
        return self._chat(ChatDelta(role="assistant", content=""), None)

    def event(self, event: StreamEvent) -> ChatCompletionChunk | CompletionChunk | None:
        self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = event.completion_tokens
        if not event.text and event.finish_reason is None:
            return None
        if self.kind == "chat":
            delta = ChatDelta(content=event.text) if event.text else ChatDelta()
            return self._chat(delta, event.finish_reason)
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(index=0, text=event.text, finish_reason=event.finish_reason)],
        )

    def usage_chunk(self) -> ChatCompletionChunk | CompletionChunk | None:
        if not self.include_usage:
            return None
        usage = _usage(self.prompt_tokens, self.completion_tokens)
        if self.kind == "chat":
            return ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def _chat(self, delta: ChatDelta, finish: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
        )


def embedding_response(
    result: EmbeddingResult, vectors: np.ndarray, encoding_format: str
) -> EmbeddingResponse:
    """The OpenAI embeddings body; ``base64`` is little-endian float32, as OpenAI sends it."""
    data: list[Embedding] = []
    for i, row in enumerate(np.asarray(vectors, dtype="<f4")):
        value: list[float] | str = (
            base64.b64encode(row.tobytes()).decode("ascii")
            if encoding_format == "base64"
            else row.tolist()
        )
        data.append(Embedding(index=i, embedding=value))
    return EmbeddingResponse(
        data=data,
        model=result.model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
