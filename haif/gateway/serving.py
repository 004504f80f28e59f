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

from haif.runtimes.base import StreamTally, usage_of

if TYPE_CHECKING:
    from haif.envelope import EmbeddingResult
    from haif.runtimes.base import GenerationOutput, StreamEvent


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_response(
    model: str, outputs: list[GenerationOutput], response_id: str | None = None, n_choices: int = 1
) -> CompletionResponse:
    """The /v1/completions body; its id is the job's id when the request has a job.

    ``outputs`` holds ``n_choices`` outputs per prompt, prompt by prompt: choice ``index``
    is prompt ``index // n`` 's choice ``index % n``, as OpenAI numbers them."""
    return CompletionResponse(
        id=response_id or new_id("cmpl"),
        created=now(),
        model=model,
        choices=[
            CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason)
            for i, o in enumerate(outputs)
        ],
        usage=_usage(*usage_of(outputs, n_choices)),
    )


def chat_response(
    model: str, outputs: list[GenerationOutput], response_id: str | None = None, n_choices: int = 1
) -> ChatCompletionResponse:
    """The /v1/chat/completions body: one prompt (the conversation), ``n_choices`` outputs."""
    if len(outputs) != n_choices:
        raise ValueError(f"a chat answer has {n_choices} choices; got {len(outputs)} outputs")
    return ChatCompletionResponse(
        id=response_id or new_id("chatcmpl"),
        created=now(),
        model=model,
        choices=[
            ChatChoice(index=i, message=ChatMessageOut(content=o.text), finish_reason=o.finish_reason)
            for i, o in enumerate(outputs)
        ],
        usage=_usage(*usage_of(outputs, n_choices)),
    )


class StreamFormatter:
    """Builds the chunks of one streamed response, OpenAI style."""

    def __init__(
        self, kind: str, model: str, include_usage: bool, response_id: str | None = None,
        n_choices: int = 1,
    ) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = response_id or new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        self.n_choices = n_choices
        self._tally = StreamTally(n_choices)

    @property
    def prompt_tokens(self) -> int:
        return self._tally.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Every choice's, so far."""
        return self._tally.completion_tokens

    @property
    def finished(self) -> bool:
        """Whether every choice has had its finish reason: the answer is whole."""
        return self._tally.finished

    def first(self) -> ChatCompletionChunk | None:
        if self.kind != "chat":
            return None
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""), finish_reason=None)
                for i in range(self.n_choices)
            ],
        )

    def event(self, event: StreamEvent) -> ChatCompletionChunk | CompletionChunk | None:
        self._tally.add(event)
        if not event.text and event.finish_reason is None:
            return None
        if self.kind == "chat":
            delta = ChatDelta(content=event.text) if event.text else ChatDelta()
            return self._chat(event.index, delta, event.finish_reason)
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(index=event.index, text=event.text, finish_reason=event.finish_reason)],
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

    def _chat(self, index: int, delta: ChatDelta, finish: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish)],
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
