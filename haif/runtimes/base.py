"""The runtime interface every model backend implements (echo, torch, embeddings, vLLM).

A runtime lives inside one worker actor. The worker calls ``load`` once, then any
number of ``stream`` / ``generate`` / ``embed`` calls concurrently from its event
loop, then ``unload``. Runtimes must be cancellation-safe: when the consumer of
``stream`` stops iterating (client gone, deadline), the runtime frees what the
request held.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from haif.exceptions import PromptTooLong, UnsupportedOperation

if TYPE_CHECKING:
    import numpy as np

    from haif.config import ModelConfig

FinishReason = Literal["stop", "length"]


def quiet_transformers() -> None:
    """No progress bars from ``transformers`` where HAIF loads models: they are noise in the
    logs, and a process that loaded models on worker threads was seen to hang for good in
    tqdm's write lock (a bar's ``__del__``, while loading weights)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class SamplingParams:
    """What a generation request asks of the sampler (OpenAI semantics)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RuntimeContext:
    """Everything a runtime needs besides its model config."""

    model: ModelConfig
    model_dir: str | None
    device: str  # "cpu" or "cuda"
    max_prompt_tokens: int


@dataclass(frozen=True)
class StreamEvent:
    """One step of a stream: new text and how many tokens it took.

    The last event of a stream carries ``finish_reason``; every event carries the
    prompt's token count so that usage is known whenever the stream stops.
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass
class EmbeddingOutput:
    vectors: np.ndarray  # float32, shape (n_inputs, dim), L2-normalised where the model says so
    prompt_tokens: int


@dataclass
class ChatMessage:
    role: str
    content: str
    name: str | None = field(default=None)


class Runtime(abc.ABC):
    """One loaded model. Subclasses set ``capabilities`` and implement what they offer."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]  # subset of {"generate", "embed"}

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    async def load(self) -> None:
        """Load weights and tokenizer; raise on any failure (never a half-loaded model)."""

    async def unload(self) -> None:
        """Free what ``load`` took. Default: nothing to free."""
        return None

    # --- generation ---------------------------------------------------------------

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """Turn chat messages into one prompt with the model's chat template."""
        raise UnsupportedOperation(f"model {self.ctx.model.name!r} does not support chat")

    def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Yield the completion of ``prompt`` as it is produced.

        Raises:
            PromptTooLong: the prompt exceeds the limits.
            UnsupportedOperation: the model does not generate text.
        """
        raise UnsupportedOperation(f"model {self.ctx.model.name!r} does not generate text")

    async def generate(self, prompt: str, params: SamplingParams) -> GenerationOutput:
        """The whole completion at once. Default: drain ``stream``."""
        parts: list[str] = []
        last: StreamEvent | None = None
        async with contextlib.aclosing(self.stream(prompt, params)) as events:
            async for event in events:
                parts.append(event.text)
                last = event
        if last is None:  # a stream always ends with a finish_reason event
            raise RuntimeError("runtime stream ended without events")
        return GenerationOutput(
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason or "length",
        )

    # --- embeddings -----------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbeddingOutput:
        """Embed each text.

        Raises:
            PromptTooLong: an input exceeds the limits.
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


def _ends_stream(item: StreamEvent | BaseException | None) -> bool:
    return not isinstance(item, StreamEvent) or item.finish_reason is not None


async def coalesce(
    events: AsyncIterator[StreamEvent],
    min_interval_s: float | Callable[[], float] = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[StreamEvent]:
    """Merge the events that pile up while the consumer is busy into one.

    Every event yielded by a worker becomes a Ray object that crosses four hops (worker,
    Orchestrator, Gateway, Bridge, HTTP proxy); forwarding tokens one by one costs CPU
    the engine needs. This reader drains ``events`` into a queue and hands over
    everything that is there: a slow consumer sees fewer, larger pieces.

    With ``min_interval_s`` > 0 (the model's ``stream_batch_ms``), the first piece leaves
    at once and each later one no sooner than ``min_interval_s`` after the one before,
    with every token that arrived in between; the piece that ends the stream (finish
    reason, error or end) leaves as soon as it exists. 0 hands each event over as soon
    as the consumer takes it. Closing the returned generator closes ``events``.
    """
    queue: asyncio.Queue[StreamEvent | BaseException | None] = asyncio.Queue()
    ended = asyncio.Event()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(events) as source:
                async for event in source:
                    queue.put_nowait(event)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)
        finally:
            ended.set()

    task = asyncio.ensure_future(pump())
    last_sent: float | None = None
    try:
        while True:
            item = await queue.get()
            interval_s = min_interval_s() if callable(min_interval_s) else min_interval_s
            if interval_s > 0 and last_sent is not None and not _ends_stream(item):
                wait_s = last_sent + interval_s - clock()
                if wait_s > 0:
                    # Woken early when the stream ends: its last piece never waits.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ended.wait(), wait_s)
            merged: StreamEvent | None = None
            while True:
                if item is None or isinstance(item, BaseException):
                    if merged is not None:
                        yield merged
                    if item is None:
                        return
                    raise item
                merged = item if merged is None else StreamEvent(
                    merged.text + item.text, item.completion_tokens, item.prompt_tokens, item.finish_reason
                )
                if queue.empty():
                    break
                item = queue.get_nowait()
            last_sent = clock()
            yield merged
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
