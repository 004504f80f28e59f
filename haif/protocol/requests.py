"""OpenAI request bodies: /v1/completions, /v1/chat/completions, /v1/embeddings.

Unknown fields are a 422. Parameters of the API that HAIF knows but no text model here
can honour (image or audio content, ``audio``, ``modalities`` other than text,
``prediction``) are accepted by these models and refused at the edge with a 400 that
names them (``unsupported``), never silently ignored.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from haif.protocol._base import (
    MAX_CHOICES,
    FunctionName,
    ModelName,
    StopString,
    Text,
    TokenId,
    TokenIds,
    _Request,
)

MAX_LOGIT_BIAS = 300  # entries, as OpenAI bounds them
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20  # chat
MAX_COMPLETION_LOGPROBS = 5  # legacy completions
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128  # on one assistant message

ToolMode = Literal["none", "auto", "required", "named"]


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
    user: Text | None = Field(None, max_length=256, description="The end user; recorded on the job.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description=f"Token id (a string) → bias in [-100, 100]; at most {MAX_LOGIT_BIAS}."
    )
    # vLLM's extra sampling parameters, as its OpenAI server takes them in the body.
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="> 1 discourages repeats.")
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="-1, 0 or null: off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=1_048_576, description="No stop (EOS, stop_token_ids) before.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise ValueError(f"keys are token ids; {key[:20]!r} is not one")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {key}: the bias must be between -100 and 100")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @abstractmethod
    def logprobs_count(self) -> int | None:
        """Alternatives per token asked for (0: only the chosen token's); None: no logprobs."""

    def unsupported(self) -> list[str]:
        """The parameters that no HAIF text model honours, by their JSON path."""
        return []


Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


def _as_list(value: Any) -> list[Any]:
    """One prompt or input, or a list of them, as a list (a list of ints is one prompt)."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


class CompletionRequest(_SamplingFields):
    prompt: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    max_tokens: int | None = Field(None, ge=1, le=1_048_576)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = Field(False, description="Return the prompt before the completion.")

    def prompts(self) -> list[str | list[int]]:
        return _as_list(self.prompt)

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


class MediaContentPart(BaseModel):
    """Image, audio and file parts: parsed so that they can be refused by name (400)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


ContentPart = Annotated[TextContentPart | MediaContentPart, Field(discriminator="type")]


class FunctionCallIn(_Request):
    name: FunctionName
    arguments: Text = Field(max_length=1_048_576, description="JSON, as the model wrote it.")


class ToolCallIn(_Request):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOL_CALLS)
    tool_call_id: Text | None = Field(None, min_length=1, max_length=256)
    refusal: Text | None = Field(None, description="An assistant turn's refusal, as answered.")

    @model_validator(mode="after")
    def _shape(self) -> ChatMessageIn:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a 'tool' message needs its 'tool_call_id'")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("only 'tool' messages carry 'tool_call_id'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry 'tool_calls'")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError("'content' is required (only an assistant's tool calls go without)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextContentPart))

    def tool_calls_json(self) -> list[dict[str, Any]]:
        """The assistant's tool calls as a chat template reads them (arguments as an object
        when they parse as one)."""
        out: list[dict[str, Any]] = []
        for call in self.tool_calls or ():
            try:
                arguments: Any = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            out.append({
                "id": call.id, "type": "function",
                "function": {"name": call.function.name, "arguments": arguments},
            })
        return out


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: FunctionName
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema.")
    strict: bool | None = None


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=1_048_576, description="Deprecated alias.")
    max_completion_tokens: int | None = Field(None, ge=1, le=1_048_576)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Accepted so that they are refused by name (``unsupported``): no text model does audio.
    audio: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    prediction: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in 'tools'")
        if self.tool_choice in ("auto", "required") and not names:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs 'tools'")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_mode(self) -> tuple[ToolMode, str | None]:
        """How the answer may call tools, and the function a named choice forces."""
        if not self.tools or self.tool_choice == "none":
            return "none", None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named", self.tool_choice.function.name
        return self.tool_choice or "auto", None

    def unsupported(self) -> list[str]:
        found: list[str] = []
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, MediaContentPart):
                        found.append(f"messages[{i}].content[{j}] (type {part.type!r})")
        if self.audio is not None:
            found.append("audio")
        if self.modalities is not None and "audio" in self.modalities:
            found.append("modalities (audio)")
        if self.prediction is not None:
            found.append("prediction")
        return found


class EmbeddingRequest(_Request):
    model: ModelName
    input: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65_536)
    user: Text | None = Field(None, max_length=256)

    def inputs(self) -> list[str | list[int]]:
        return _as_list(self.input)
