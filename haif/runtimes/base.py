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
from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True)
class StreamEvent:
    """One step of a stream: new text and how many tokens it took.

    The last event of a stream carries ``finish_reason``; every event carries the
    prompt's token count so that usage is known whenever the stream stops.
    ``completion_tokens`` counts the tokens of its choice (``index``, for ``n`` > 1) so far.
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: FinishReason | None = None
    index: int = 0


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


_Queued = StreamEvent | BaseException | None  # an event, a failure, or the end (None)


async def _pump(
    stream: AsyncIterator[StreamEvent], queue: asyncio.Queue[_Queued], index: int | None = None
) -> None:
    """Put ``stream``'s events into ``queue`` (tagged with choice ``index`` when given),
    then None; a failure goes in instead, for the consumer to re-raise. ``stream`` is
    closed however this ends."""
    try:
        async with contextlib.aclosing(stream) as events:  # type: ignore[type-var]
            async for event in events:
                queue.put_nowait(event if index is None else replace(event, index=index))
        queue.put_nowait(None)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # handed to the consumer, which re-raises it
        queue.put_nowait(exc)


def _ends_stream(item: _Queued) -> bool:
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
    queue: asyncio.Queue[_Queued] = asyncio.Queue()
    ended = asyncio.Event()

    async def pump() -> None:
        try:
            await _pump(events, queue)
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
                merged = item if merged is None else replace(item, text=merged.text + item.text)
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


async def merge_choices(streams: Sequence[AsyncIterator[StreamEvent]]) -> AsyncIterator[StreamEvent]:
    """The events of a request's choices (one stream each, ``n`` > 1) as one stream, each
    event tagged with its choice's index, in the order they come.

    A failure of any choice ends the merged stream with it; closing the merged stream
    (or its failure) closes every choice's stream.
    """
    queue: asyncio.Queue[_Queued] = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(s, queue, i)) for i, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
