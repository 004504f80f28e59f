"""The torch runtime's queue and batching loop: requests wait in one queue per event loop,
and a loop takes up to ``torch.max_batch_size`` of them, waiting at most
``torch.max_wait_ms`` after the first arrived, for the runtime to generate as one batch."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from haif.exceptions import HaifError, InternalError

if TYPE_CHECKING:
    from haif.config import ModelConfig
    from haif.runtimes.base import SamplingParams, StreamEvent

logger = logging.getLogger("haif.runtimes.torch")


@dataclass(eq=False)
class QueuedRequest:
    """One queued generation; shared by its stream (event loop) and the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    grammar: Any = None  # the compiled grammar of ``params.guide``
    echo_text: str = ""  # the prompt, sent first when ``params.echo``
    queue: asyncio.Queue[StreamEvent | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the stream when its consumer goes away
    finished: bool = False  # set when the final event or an error was sent
    adapter: str | None = None  # a loaded LoRA adapter applied to this row; None: the base

    def send(self, item: StreamEvent | BaseException, *, final: bool = False) -> None:
        """Deliver ``item`` from any thread."""
        if final:
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Batcher:
    """Queue and batching loop bound to one event loop.

    Args:
        model: the model's config (its ``torch`` batching options, its name).
        loop: the event loop the queue belongs to.
        run: generates one batch (in the runtime's worker thread).
        on_batch: told each batch's size; on_failure: told each batch that failed.
    """

    def __init__(
        self, model: ModelConfig, loop: asyncio.AbstractEventLoop,
        run: Callable[[list[QueuedRequest]], Awaitable[None]],
        on_batch: Callable[[int], None], on_failure: Callable[[], None],
    ) -> None:
        self.model = model
        self.loop = loop
        self._run_batch, self._on_batch, self._on_failure = run, on_batch, on_failure
        self.pending: collections.deque[QueuedRequest] = collections.deque()
        self.wakeup = asyncio.Event()
        self.task = loop.create_task(self._run(), name=f"haif-batcher-{model.name}")
        self.task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return  # cancelled by close() or by its event loop shutting down
        logger.error("model %r: batching loop died", self.model.name, exc_info=task.exception())
        while self.pending:  # never leave a queued request waiting for a dead loop
            self.pending.popleft().send(
                InternalError(f"batching loop failed: {task.exception()!r}"), final=True
            )

    def submit(self, req: QueuedRequest) -> None:
        self.pending.append(req)
        self.wakeup.set()

    def discard(self, req: QueuedRequest) -> None:
        with contextlib.suppress(ValueError):  # ValueError: already taken into a batch
            self.pending.remove(req)

    async def close(self, reason: HaifError) -> None:
        self.task.cancel()
        await asyncio.wait([self.task])
        while self.pending:
            self.pending.popleft().send(reason, final=True)

    async def _next_batch(self) -> list[QueuedRequest]:
        options = self.model.torch
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.pending[0].enqueued_at + options.max_wait_ms / 1000.0
        while len(self.pending) < options.max_batch_size:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch: list[QueuedRequest] = []
        while self.pending and len(batch) < options.max_batch_size:
            req = self.pending.popleft()
            if not req.cancelled:
                batch.append(req)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._on_batch(len(batch))
            try:
                await self._run_batch(batch)
            except Exception as exc:  # handled: every unfinished request of the batch gets it
                self._on_failure()
                logger.exception("model %r: batch of %d failed", self.model.name, len(batch))
                for req in batch:
                    if not req.finished:
                        req.send(exc, final=True)
