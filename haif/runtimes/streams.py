"""Streams of events between a runtime and its consumers: piled-up events merged into one
(``coalesce``), a request's choices merged into one stream (``merge_choices``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from haif.runtimes.base import StreamEvent

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
                merged = item if merged is None else replace(
                    item, text=merged.text + item.text, logprobs=merged.logprobs + item.logprobs
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
