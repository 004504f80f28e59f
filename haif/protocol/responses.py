"""OpenAI response bodies and stream chunks (generations are shaped by
``haif.gateway.serving``; embeddings, which need no Gateway state, by ``embedding_response``)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from haif.protocol._base import _Response

if TYPE_CHECKING:
    import numpy as np


FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


# --- logprobs ----------------------------------------------------------------------------


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    """One token of a chat answer: ``token`` is its text (the tokens join to the answer)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(_Response):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


# --- completions -------------------------------------------------------------------------


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(_Response):
    """A streamed /v1/completions event (OpenAI reuses the ``text_completion`` object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- chat ----------------------------------------------------------------------------------


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    """A piece of a streamed tool call: its first carries id, type and name; the pieces'
    ``arguments`` join to the call's arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- embeddings, models, errors ------------------------------------------------------------


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def embedding_response(
    model: str, prompt_tokens: int, vectors: np.ndarray, encoding_format: str
) -> EmbeddingResponse:
    """The OpenAI embeddings body of ``vectors`` (one row an input) from ``model``;
    ``base64`` is little-endian float32, as OpenAI sends it."""
    import numpy as np  # lazy: importing the protocol stays light

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
        model=model,
        usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "haif"
    parent: str | None = Field(None, description="A LoRA adapter's base model (vLLM's field).")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail

    @field_validator("error")
    @classmethod
    def _no_trace(cls, value: ErrorDetail) -> ErrorDetail:
        if "Traceback (most recent call last)" in value.message:
            raise ValueError("error messages never carry a stack trace")
        return value


MAX_VALIDATION_DETAILS = 5
MAX_VALIDATION_MESSAGE_CHARS = 1000


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, int]:
    """One message for pydantic's errors of a request body (at most a few, bounded), and the
    status it answers: 400 for a body that is not JSON, else 422. Shared by HTTP and P2P."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", 400
    parts: list[str] = []
    for e in errors:
        # Drop pydantic's union/validator tags ("list[str]", "function-after[...]").
        loc = ".".join(
            str(p) for p in e.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p)
        ) or "body"
        part = f"{loc}: {e.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    more = len(parts) - MAX_VALIDATION_DETAILS
    parts = parts[:MAX_VALIDATION_DETAILS]
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)[:MAX_VALIDATION_MESSAGE_CHARS], 422
