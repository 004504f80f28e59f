"""The Bridge's SSE body: the end of an answer reaches the client as soon as the answer is
whole, in one write, without waiting for the end of the worker's stream (read after it,
so that the call ends rather than being cancelled); a client that leaves mid-stream stops
the generation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from haif.bridge.serving import SSE_DONE, _sse_body, _StreamTimer, sse
from haif.exceptions import WorkerUnavailable
from haif.protocol import CompletionChoice, CompletionChunk, Usage

pytestmark = pytest.mark.unit

END = object()  # the end of the stream, as the Gateway's pipeline reports it


class Stream:
    """The Bridge's view of ``Pipeline.stream``: items as the test releases them."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False
        self.ended = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        item = await self.items.get()
        if item is END:
            self.ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        if not self.ended:
            self.cancelled = True


class Timings:
    def __init__(self) -> None:
        self.chunks = 0

    def first_token(self, model: str, seconds: float) -> None:
        self.chunks += 1

    def inter_token(self, model: str, seconds: float) -> None:
        self.chunks += 1


def chunk(text: str, finish: str | None = None, index: int = 0) -> CompletionChunk:
    return CompletionChunk(
        id="cmpl-1", created=1, model="m",
        choices=[CompletionChoice(index=index, text=text, finish_reason=finish)],
    )


def usage() -> CompletionChunk:
    return CompletionChunk(
        id="cmpl-1", created=1, model="m", choices=[],
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )


def event(c: CompletionChunk) -> bytes:
    return sse(c.model_dump_json().encode())


def body_of(stream: Stream, first: Any, include_usage: bool, timings: Timings | None = None,
            n_choices: int = 1) -> Any:
    timer = _StreamTimer(timings or Timings(), "m", 0.0)  # type: ignore[arg-type]
    return _sse_body(stream, first, "req-1", timer, include_usage, n_choices)


async def until_done(body: Any) -> list[bytes]:
    """The writes up to the one that ends with [DONE] (the client has its answer then)."""
    out: list[bytes] = []
    while not out or not out[-1].endswith(SSE_DONE):
        out.append(await anext(body))
    return out


async def writes(stream: Stream, first: Any, include_usage: bool, timings: Timings | None = None,
                 n_choices: int = 1) -> list[bytes]:
    return [w async for w in body_of(stream, first, include_usage, timings, n_choices)]


async def ended(stream: Stream, body: Any) -> None:
    """Release the end of ``stream``: the body reads it and ends, the call not cancelled."""
    stream.items.put_nowait(END)
    assert await asyncio.wait_for(anext(body, None), 5) is None
    assert stream.ended and not stream.cancelled


async def test_the_last_text_its_usage_and_done_leave_in_one_write_before_the_stream_ends() -> None:
    stream = Stream()
    for item in (chunk(" b"), chunk(" c", "length"), usage()):
        stream.items.put_nowait(item)
    timings = Timings()
    # The end of the stream has not come back: the body must not wait for it.
    body = body_of(stream, chunk("a"), include_usage=True, timings=timings)
    out = await asyncio.wait_for(until_done(body), 5)
    assert out == [
        event(chunk("a")),
        event(chunk(" b")),
        event(chunk(" c", "length")) + event(usage()) + SSE_DONE,
    ]
    assert timings.chunks == 4
    await ended(stream, body)  # the answer is whole: the call is read to its end, not cancelled


async def test_without_usage_the_chunk_with_the_finish_reason_is_the_last() -> None:
    stream = Stream()
    stream.items.put_nowait(chunk(" b", "stop"))
    body = body_of(stream, chunk("a"), include_usage=False)
    out = await asyncio.wait_for(until_done(body), 5)
    assert out == [event(chunk("a")), event(chunk(" b", "stop")) + SSE_DONE]
    await ended(stream, body)


async def test_with_several_choices_the_answer_ends_with_the_last_choice_to_finish() -> None:
    for include_usage in (False, True):
        stream = Stream()
        # Choice 0 finishes first, and again (a repeat must not count as choice 1's end).
        rest = [chunk(" b", "stop", 0), chunk("y", None, 1), chunk("", "stop", 0), chunk(" z", "length", 1)]
        for item in rest + ([usage()] if include_usage else []):
            stream.items.put_nowait(item)
        body = body_of(stream, chunk("x", None, 1), include_usage, n_choices=2)
        out = await asyncio.wait_for(until_done(body), 5)
        last = event(chunk(" z", "length", 1)) + (event(usage()) if include_usage else b"") + SSE_DONE
        assert out == [event(c) for c in [chunk("x", None, 1), *rest[:3]]] + [last]
        await ended(stream, body)


async def test_a_stream_that_ends_without_a_finish_reason_still_ends_with_done() -> None:
    stream = Stream()
    stream.items.put_nowait(END)
    out = await asyncio.wait_for(writes(stream, chunk("a"), include_usage=True), 5)
    assert out == [event(chunk("a")), SSE_DONE]
    assert stream.ended and not stream.cancelled


async def test_an_error_after_the_last_text_follows_it_as_an_error_event() -> None:
    stream = Stream()
    stream.items.put_nowait(chunk(" b", "stop"))
    stream.items.put_nowait(WorkerUnavailable("the worker died"))
    out = await asyncio.wait_for(writes(stream, chunk("a"), include_usage=True), 5)
    assert out[0] == event(chunk("a"))
    last = out[1]
    assert last.startswith(event(chunk(" b", "stop"))) and last.endswith(SSE_DONE)
    error = json.loads(last[len(event(chunk(" b", "stop"))):-len(SSE_DONE)].removeprefix(b"data: "))
    assert "the worker died" in error["error"]["message"]


async def test_a_client_that_leaves_mid_stream_cancels_the_generation() -> None:
    stream = Stream()
    timer = _StreamTimer(Timings(), "m", 0.0)  # type: ignore[arg-type]
    body = _sse_body(stream, chunk("a"), "req-1", timer, True)
    assert await anext(body) == event(chunk("a"))
    await body.aclose()
    assert stream.cancelled
