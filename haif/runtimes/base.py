"""The runtime interface every model backend implements (echo, torch, embeddings, vLLM).

A runtime lives inside one worker actor. The worker calls ``load`` once, then any
number of ``stream`` / ``generate`` / ``embed`` calls concurrently from its event
loop, then ``unload``. Runtimes must be cancellation-safe: when the consumer of
``stream`` stops iterating (client gone, deadline), the runtime frees what the
request held.
"""

from __future__ import annotations

import abc
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from haif.exceptions import PromptTooLong, UnsupportedOperation, UnsupportedParameter

if TYPE_CHECKING:
    import numpy as np

    from haif.config import ModelConfig

FinishReason = Literal["stop", "length"]
# A prompt as the client gave it: text, or the model's token ids.
Prompt = str | Sequence[int]


def quiet_transformers() -> None:
    """No progress bars from ``transformers`` where HAIF loads models: they are noise in the
    logs, and a process that loaded models on worker threads was seen to hang for good in
    tqdm's write lock (a bar's ``__del__``, while loading weights)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class Guide:
    """A grammar the output must follow, enforced by constrained decoding.

    ``json_object``: any JSON object; ``json_schema``: JSON valid against ``schema`` (its
    canonical JSON text, which is also the key of the runtime's cache of compiled grammars).
    ``param`` names the request parameter it comes from, for the errors that refuse it.
    """

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None
    param: str = "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """What a generation request asks of the sampler (OpenAI semantics, and vLLM's extras).

    Every runtime applies these per request: in a batch, each sequence keeps its own.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: none
    echo: bool = False  # the prompt first (and its tokens' logprobs, with ``logprobs``)
    guide: Guide | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def token_ids(self) -> dict[str, tuple[int, ...]]:
        """The token ids the request names, by parameter (checked against the vocabulary)."""
        return {
            "logit_bias": tuple(token for token, _ in self.logit_bias),
            "stop_token_ids": self.stop_token_ids,
        }

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of a request with ``n`` > 1: a seeded request
        samples choice i with seed + i (wrapped into the signed 64-bit range), so that its
        choices differ and the request still repeats exactly."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index + 2**63) % 2**64 - 2**63)


@dataclass(frozen=True)
class RuntimeContext:
    """Everything a runtime needs besides its model config."""

    model: ModelConfig
    model_dir: str | None
    device: str  # "cpu" or "cuda"
    max_prompt_tokens: int


class TopToken(NamedTuple):
    """One of the most likely tokens at a position: its own text, log probability and bytes."""

    token: str
    logprob: float
    raw: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of one token of the output (or of an echoed prompt).

    ``token`` is the text the token added to the output, so that a choice's tokens join to
    its text (a character split over several tokens shows with the last of them); ``raw``
    is the token's own bytes. ``logprob`` is None for a prompt's first token.
    """

    token: str
    logprob: float | None
    raw: bytes
    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """One step of a stream: new text and how many tokens it took.

    The last event of a stream carries ``finish_reason``; every event carries the
    prompt's token count so that usage is known whenever the stream stops.
    ``completion_tokens`` counts the tokens of its choice (``index``, for ``n`` > 1) so far.
    ``logprobs`` holds the tokens of ``text`` when the request asked for them.
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


class StreamTally:
    """Usage and completion of a stream's choices, from its events as they pass."""

    def __init__(self, n_choices: int = 1) -> None:
        self.prompt_tokens = 0  # the prompt's, counted once whatever ``n``, as OpenAI bills it
        self._tokens: dict[int, int] = {}
        self._open = set(range(n_choices))

    def add(self, event: StreamEvent) -> None:
        self.prompt_tokens = event.prompt_tokens
        self._tokens[event.index] = event.completion_tokens
        if event.finish_reason is not None:
            self._open.discard(event.index)

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens.values())

    @property
    def finished(self) -> bool:
        """Whether every choice has had its last event: the answer is whole."""
        return not self._open


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()


def usage_of(outputs: Sequence[GenerationOutput], n_choices: int) -> tuple[int, int]:
    """(prompt, completion) tokens of a request's outputs, ``n_choices`` per prompt in a row:
    each prompt counted once, every choice's completion counted."""
    prompt = sum(o.prompt_tokens for o in outputs[::n_choices])
    return prompt, sum(o.completion_tokens for o in outputs)


@dataclass
class EmbeddingOutput:
    vectors: np.ndarray  # float32, shape (n_inputs, dim), L2-normalised where the model says so
    prompt_tokens: int


@dataclass
class ChatMessage:
    role: str
    content: str
    name: str | None = field(default=None)
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's, as a chat template reads them
    tool_call_id: str | None = None  # a tool's answer: the call it answers


class Runtime(abc.ABC):
    """One loaded model. Subclasses set ``capabilities`` and implement what they offer."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]  # subset of {"generate", "embed"}
    supports_adapters: ClassVar[bool] = False  # LoRA adapters: load_adapter, stream(adapter=)

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    async def load(self) -> None:
        """Load weights and tokenizer; raise on any failure (never a half-loaded model)."""

    async def unload(self) -> None:
        """Free what ``load`` took. Default: nothing to free."""
        return None

    def dead(self) -> str | None:
        """Why this loaded model can serve nothing more (its engine died), or None. The
        worker's health probe reports it, and the Orchestrator replaces the worker."""
        return None

    # --- generation ---------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        """Turn chat messages (and the tools the answer may call) into one prompt with the
        model's chat template."""
        raise UnsupportedOperation(f"model {self.ctx.model.name!r} does not support chat")

    def unsupported(self, params: SamplingParams, prompts: Sequence[Prompt]) -> list[str]:
        """The request parameters this runtime cannot honour (named as in the API). Default:
        none; the torch and vLLM runtimes honour them all."""
        return []

    def check_request(self, params: SamplingParams, prompts: Sequence[Prompt]) -> None:
        """Refuse what this runtime cannot honour, by name, before any work.

        Raises:
            UnsupportedParameter: the request asks for something this runtime does not do.
        """
        refused = self.unsupported(params, prompts)
        if refused:
            raise UnsupportedParameter(
                f"model {self.ctx.model.name!r} (runtime {self.name}) does not support: "
                + ", ".join(refused)
            )

    def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Yield the completion of ``prompt`` (text or token ids) as it is produced.

        Raises:
            PromptTooLong: the prompt exceeds the limits.
            InvalidRequest: a token id is not in the vocabulary, or a grammar is refused.
            UnsupportedOperation: the model does not generate text.
        """
        raise UnsupportedOperation(f"model {self.ctx.model.name!r} does not generate text")

    async def generate(
        self, prompt: Prompt, params: SamplingParams, *, adapter: str | None = None
    ) -> GenerationOutput:
        """The whole completion at once (through a loaded LoRA ``adapter`` when given).
        Default: drain ``stream``."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        last: StreamEvent | None = None
        # Only runtimes with supports_adapters take the keyword.
        stream = (
            self.stream(prompt, params) if adapter is None
            else self.stream(prompt, params, adapter=adapter)  # type: ignore[call-arg]
        )
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                parts.append(event.text)
                logprobs.extend(event.logprobs)
                last = event
        if last is None:  # a stream always ends with a finish_reason event
            raise RuntimeError("runtime stream ended without events")
        return GenerationOutput(
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason or "length",
            logprobs=tuple(logprobs),
        )

    # --- LoRA adapters (runtimes with ``supports_adapters``) ---------------------------

    def adapters(self) -> list[str]:
        """The LoRA adapters loaded, by name."""
        return []

    async def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT LoRA directory ``path`` (verified by the caller) as ``name``; then
        ``stream(..., adapter=name)`` applies it.

        Raises:
            AdapterRejected: the runtime cannot apply it to this model; nothing was loaded.
        """
        raise UnsupportedOperation(f"model {self.ctx.model.name!r} does not take LoRA adapters")

    async def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter (requests using it have ended)."""
        return None

    # --- embeddings -----------------------------------------------------------------

    async def embed(self, texts: Sequence[Prompt]) -> EmbeddingOutput:
        """Embed each input (text, or the model's token ids taken as they are).

        Raises:
            PromptTooLong: an input exceeds the limits.
            InvalidRequest: a token id is not in the vocabulary.
            UnsupportedOperation: the model does not embed.
        """
        raise UnsupportedOperation(f"model {self.ctx.model.name!r} does not produce embeddings")

    # --- helpers for subclasses ---------------------------------------------------------

    def check_prompt(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise PromptTooLong when the prompt breaks the token limits."""
        limit = self.ctx.max_prompt_tokens
        if prompt_tokens > limit:
            raise PromptTooLong(
                f"prompt has {prompt_tokens} tokens; the limit is {limit}"
            )
        budget = self.ctx.model.max_model_len
        if prompt_tokens + max_tokens > budget:
            raise PromptTooLong(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the model's context of {budget} tokens"
            )


class StopMatcher:
    """Finds OpenAI `stop` strings in streamed text without emitting any part of them.

    Text that could still be the start of a stop string is held back until the next
    piece decides it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buffer = ""

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._buffer += text
        hits = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            out = self._buffer[: min(hits)]
            self._buffer = ""
            return out, True
        if self._hold == 0:
            out, self._buffer = self._buffer, ""
            return out, False
        cut = max(0, len(self._buffer) - self._hold)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False

    def flush(self) -> str:
        """Text held back when the stream ends without a stop string."""
        out, self._buffer = self._buffer, ""
        return out


class LogprobsAligner:
    """Keeps tokens' logprobs in step with the text a ``StopMatcher`` lets out.

    Each token's entry is added with the text it produced; ``release`` hands over the
    entries whose text has been let out (a token whose text a stop string cuts keeps the
    part before it), so that the tokens of every event join to its text... over the whole
    stream, at least: a token whose text is let out in two pieces goes with the second.
    """

    def __init__(self) -> None:
        self._pending: collections.deque[TokenLogprob] = collections.deque()
        self._released = 0  # characters let out of the first pending entry's text

    def add(self, entry: TokenLogprob) -> None:
        self._pending.append(entry)

    def release(self, chars: int, *, final: bool = False) -> tuple[TokenLogprob, ...]:
        """The entries covered once ``chars`` more characters are out; ``final``: the text
        ends there (stopped, or flushed), the rest of the entries is dropped."""
        out: list[TokenLogprob] = []
        available = self._released + chars
        while self._pending and len(self._pending[0].token) <= available:
            entry = self._pending.popleft()
            available -= len(entry.token)
            out.append(entry)
        self._released = available
        if final:
            if self._pending and available:
                entry = self._pending[0]
                out.append(replace(entry, token=entry.token[:available]))
            self._pending.clear()
            self._released = 0
        return tuple(out)
