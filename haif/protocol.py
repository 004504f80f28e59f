"""OpenAI-compatible request and response models, shared by the Bridge, the Gateway and the SDK.

Requests forbid unknown fields: a parameter HAIF does not implement is a clear 422,
never silently ignored. Bounds here are the API's own; the operator's tighter limits
(``LimitsConfig``) are checked by ``haif.envelope.check_limits``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_ID_CHARS = 256
MAX_STOP_CHARS = 256
MAX_CHOICES = 128  # `n`, as OpenAI bounds it



def _valid_unicode(value: str) -> str:
    """Reject lone surrogates (valid JSON escapes, but not text any model can read)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogate code points)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
ModelName = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
StopString = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with usage.")


class _SamplingFields(_Request):
    model: ModelName
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(
        1, ge=1, le=MAX_CHOICES,
        description="Choices per prompt, each sampled on its own (a seeded request samples choice i "
        "with seed + i); the operator's limits.max_choices bounds it further.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(None, description="Stop sequences.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: Text | None = Field(None, max_length=256)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextContentPart]
    name: Text | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=1_048_576, description="Deprecated alias.")
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(_Request):
    model: ModelName
    input: Text | Annotated[list[Text], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65_536)
    user: Text | None = Field(None, max_length=256)

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- responses -----------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(_Response):
    """A streamed /v1/completions event (OpenAI reuses the ``text_completion`` object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "haif"


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


# --- HAIF's own records (not part of the OpenAI API) -------------------------------------


class JobRecord(_Response):
    """One admitted request; completions and chat responses carry its id as their ``id``."""

    id: str
    object: Literal["job"] = "job"
    kind: Literal["completion", "chat", "embedding"]
    model: str
    version: str
    state: Literal["reserved", "running", "succeeded", "failed", "dead_lettered"]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1  # dispatches to workers, retries included
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None


class JobList(_Response):
    object: Literal["list"] = "list"
    data: list[JobRecord]


class UsageRecord(_Response):
    """One served job, as ``haif usage export`` and the billing webhook send it."""

    tenant: str
    model: str
    version: str
    job_id: str
    prompt_tokens: int
    completion_tokens: int
    started_at: str
    finished_at: str


class UsageList(_Response):
    object: Literal["list"] = "list"
    data: list[UsageRecord]
