"""The torch runtime: a Hugging Face causal LM run by transformers, with dynamic batching.

``stream`` tokenizes the prompt, checks its limits, and queues the request. One batching
loop per event loop takes up to ``max_batch_size`` queued requests, waiting at most
``max_wait_ms`` after the first arrived, and generates for the whole batch step by step
in a single worker thread: left-padded prompts with an attention mask and explicit
position ids, one KV cache for the batch, per-row sampling, stop and length checks.
Each new token's text goes back to its request's queue as soon as it is produced.
Requests that arrive while a batch runs wait for the next batch; rows that finish or
whose consumer goes away are dropped from the batch (and its cache) at the next step.

torch and transformers are imported only when a model loads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from haif.exceptions import (
    HaifError,
    InternalError,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotReady,
    WorkerUnavailable,
)
from haif.runtimes import hf
from haif.runtimes.base import (
    ChatMessage,
    FinishReason,
    Runtime,
    RuntimeContext,
    SamplingParams,
    StopMatcher,
    StreamEvent,
    quiet_transformers,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class _IncrementalDecoder:
    """Text of a growing token list, one delta per token, correct for byte-level BPE.

    Decodes the tokens since the last emitted chunk together with that chunk (context
    for tokenizers whose pieces depend on their neighbours) and emits the new suffix;
    while the text ends in U+FFFD, a multi-byte character is incomplete and is held back.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(done) :]


@dataclass(eq=False)
class _Request:
    """One queued generation; shared by its stream (event loop) and the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    queue: asyncio.Queue[StreamEvent | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the stream when its consumer goes away
    finished: bool = False  # set when the final event or an error was sent

    def send(self, item: StreamEvent | BaseException, *, final: bool = False) -> None:
        """Deliver ``item`` from any thread."""
        if final:
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class _Row:
    """Per-request generation state inside a running batch (worker thread only)."""

    def __init__(self, req: _Request, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        import torch

        self.req = req
        self.decoder = _IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(req.params.stop)
        self.eos_ids = eos_ids
        self.done = False
        self.count = 0
        self.generator: torch.Generator | None = None
        if not req.params.greedy:
            self.generator = torch.Generator()
            if req.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(req.params.seed)

    def advance(self, token_id: int) -> StreamEvent | None:
        """Take the next token; return the event it makes (the final one sets ``done``)."""
        eos = token_id in self.eos_ids
        delta = "" if eos else self.decoder.push(token_id)  # EOS counts but shows no text
        self.count += 1
        n = self.count
        if eos or n >= self.req.params.max_tokens:
            delta += self.decoder.flush()
        text, stopped = self.matcher.feed(delta)
        reason: FinishReason | None = None
        if stopped or eos:
            reason = "stop"
        elif n >= self.req.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.done = True
            if not stopped:
                text += self.matcher.flush()
            return StreamEvent(text, n, len(self.req.prompt_ids), reason)
        return StreamEvent(text, n, len(self.req.prompt_ids)) if text else None


def _sample(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Next token per row: argmax for greedy rows, temperature + top-p for the others."""
    import torch

    tokens = logits.argmax(dim=-1).tolist()
    picked = [i for i, row in enumerate(rows) if row.generator is not None]
    if not picked:
        return tokens
    device = logits.device
    sub = logits.index_select(0, torch.tensor(picked, device=device)).float()
    params = [rows[i].req.params for i in picked]
    temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    probs, order = torch.softmax(sub / temps, dim=-1).sort(dim=-1, descending=True)
    keep = (probs.cumsum(dim=-1) - probs) < top_p  # always keeps the most likely token
    cumulative = (probs * keep).cumsum(dim=-1)
    # Uniforms come from each row's own CPU generator: a seeded row draws the same
    # numbers whatever else is in its batch and on whichever device.
    draws = torch.cat([torch.rand(1, generator=rows[i].generator) for i in picked]).to(device)
    targets = (draws * cumulative[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cumulative, targets, right=True)
    index = torch.minimum(index, keep.sum(dim=-1, keepdim=True) - 1)
    for i, token in zip(picked, order.gather(1, index).squeeze(1).tolist(), strict=True):
        tokens[i] = token
    return tokens


class _Batcher:
    """Queue and batching loop bound to one event loop."""

    def __init__(self, runtime: TorchRuntime, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime
        self.loop = loop
        self.pending: collections.deque[_Request] = collections.deque()
        self.wakeup = asyncio.Event()
        self.task = loop.create_task(self._run(), name=f"haif-batcher-{runtime.ctx.model.name}")
        self.task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return  # cancelled by close() or by its event loop shutting down
        logger.error("model %r: batching loop died", self.runtime.ctx.model.name,
                     exc_info=task.exception())
        while self.pending:  # never leave a queued request waiting for a dead loop
            self.pending.popleft().send(
                InternalError(f"batching loop failed: {task.exception()!r}"), final=True
            )

    def submit(self, req: _Request) -> None:
        self.pending.append(req)
        self.wakeup.set()

    def discard(self, req: _Request) -> None:
        with contextlib.suppress(ValueError):  # ValueError: already taken into a batch
            self.pending.remove(req)

    async def close(self, reason: HaifError) -> None:
        self.task.cancel()
        await asyncio.wait([self.task])
        while self.pending:
            self.pending.popleft().send(reason, final=True)

    async def _next_batch(self) -> list[_Request]:
        model = self.runtime.ctx.model
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.pending[0].enqueued_at + model.max_wait_ms / 1000.0
        while len(self.pending) < model.max_batch_size:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_Request] = []
        while self.pending and len(batch) < model.max_batch_size:
            req = self.pending.popleft()
            if not req.cancelled:
                batch.append(req)
        return batch

    async def _run(self) -> None:
        runtime = self.runtime
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            runtime._record_batch(len(batch))
            try:
                await self.loop.run_in_executor(runtime._executor, runtime._run_batch, batch)
            except Exception as exc:  # handled: every unfinished request of the batch gets it
                runtime._bump("failed_batches")
                logger.exception("model %r: batch of %d failed", runtime.ctx.model.name, len(batch))
                for req in batch:
                    if not req.finished:
                        req.send(exc, final=True)


class TorchRuntime(Runtime):
    """A transformers causal LM with dynamic batching (see the module docstring)."""

    name = "torch"
    capabilities = frozenset({"generate"})

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._bos_id: int | None = None
        self._pad_id = 0
        self._forward_kwargs: dict[str, Any] = {}
        self._cache_kw = "cache"
        self._new_cache: Callable[[], Any] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: _Batcher | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._stats = {"batches": 0, "batched_requests": 0, "max_batch_seen": 0,
                       "cancelled": 0, "active": 0, "failed_batches": 0}

    # --- lifecycle ----------------------------------------------------------------------

    async def load(self) -> None:
        """Load tokenizer and weights in a thread; raise ModelLoadFailed on any failure."""
        if self._model is not None:
            return
        if not self.ctx.model_dir:
            raise ModelLoadFailed(f"model {self.ctx.model.name!r} has no model directory")
        try:
            await asyncio.to_thread(self._load_sync, self.ctx.model_dir)
        except HaifError:
            raise
        except Exception as exc:
            raise ModelLoadFailed(
                f"model {self.ctx.model.name!r} failed to load from {self.ctx.model_dir}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="haif-torch")

    def _load_sync(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

        if self.ctx.model.torch_threads:
            torch.set_num_threads(self.ctx.model.torch_threads)
        if self.ctx.device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadFailed(f"model {self.ctx.model.name!r}: CUDA is not available")
        device = torch.device(self.ctx.device)
        quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, self.ctx.model.dtype)
        )
        model.to(device).eval()
        eos: set[int] = set()
        generation_eos = getattr(model.generation_config, "eos_token_id", None)
        for value in (tokenizer.eos_token_id, generation_eos):
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        forward = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self._forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._new_cache = lambda: DynamicCache(config=model.config)
        self._eos_ids = frozenset(eos)
        self._bos_id = tokenizer.bos_token_id
        candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id)
        self._pad_id = next((t for t in candidates if t is not None), 0)  # masked out anyway
        self._device = device
        self._tokenizer = tokenizer
        self._model = model

    async def unload(self) -> None:
        """Stop batching, fail what is queued or running, and drop the model."""
        self._closing = True
        reason = WorkerUnavailable(f"model {self.ctx.model.name!r} is unloading")
        batcher, self._batcher = self._batcher, None
        if batcher is not None and not batcher.loop.is_closed():
            if batcher.loop is asyncio.get_running_loop():
                await batcher.close(reason)
            else:  # its loop runs in another thread: close it there
                asyncio.run_coroutine_threadsafe(batcher.close(reason), batcher.loop)
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        on_cuda = self._device is not None and self._device.type == "cuda"
        self._model = self._tokenizer = None
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def stats(self) -> dict[str, int]:
        """Batching counters: batches, batched_requests, max_batch_seen, cancelled, active, ..."""
        with self._lock:
            out = dict(self._stats)
        out["pending"] = len(self._batcher.pending) if self._batcher is not None else 0
        return out

    def _bump(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _record_batch(self, size: int) -> None:
        with self._lock:
            self._stats["batches"] += 1
            self._stats["batched_requests"] += size
            self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], size)

    def _set_active(self, n: int) -> None:
        with self._lock:
            self._stats["active"] = n

    # --- requests -----------------------------------------------------------------------

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return hf.render_chat(self._require_loaded(), messages, self.ctx.model.name)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as generation sees them (with at most one BOS)."""
        return hf.encode_prompt(self._require_loaded(), prompt, self._bos_id)

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty and the model has no BOS token")
        self.check_prompt(len(prompt_ids), params.max_tokens)
        if params.max_tokens <= 0:
            yield StreamEvent("", 0, len(prompt_ids), "length")
            return
        loop = asyncio.get_running_loop()
        batcher = self._batcher_for(loop)
        req = _Request(prompt_ids, params, loop, loop.time())
        batcher.submit(req)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, HaifError):
                    raise item
                if isinstance(item, BaseException):
                    message = f"generation failed: {type(item).__name__}: {item}"
                    raise InternalError(message) from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                req.cancelled = True
                batcher.discard(req)
                self._bump("cancelled")

    def _require_loaded(self) -> Any:
        if self._tokenizer is None or self._closing:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        return self._tokenizer

    def _batcher_for(self, loop: asyncio.AbstractEventLoop) -> _Batcher:
        batcher = self._batcher
        # One loop per event loop (a worker has one; tests run several in turn), and a
        # fresh one if the last died (its requests were failed by its done callback).
        if batcher is None or batcher.loop is not loop or batcher.task.done():
            batcher = self._batcher = _Batcher(self, loop)
        return batcher

    # --- the worker thread ----------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **{self._cache_kw: cache}, **self._forward_kwargs)
        return out.logits[:, -1, :]

    def _run_batch(self, reqs: list[_Request]) -> None:
        """Generate for ``reqs`` until every row is finished or cancelled."""
        import torch

        try:
            with torch.inference_mode():
                self._generate(reqs)
        finally:
            self._set_active(0)

    def _generate(self, reqs: list[_Request]) -> None:
        import torch

        device = self._device
        rows = [_Row(req, self._tokenizer, self._eos_ids) for req in reqs]
        width = max(len(req.prompt_ids) for req in reqs)
        ids = torch.full((len(reqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, req in enumerate(reqs):  # left padding: every row's last token is at -1
            ids[i, width - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids)
            mask[i, width - len(req.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = self._new_cache()
        self._set_active(len(rows))
        logits = self._forward(ids, mask, positions, cache)
        while True:
            tokens = _sample(logits, rows)
            if self._closing:
                reason = WorkerUnavailable(f"model {self.ctx.model.name!r} is unloading")
                for row in rows:
                    row.req.send(reason, final=True)
                return
            keep: list[int] = []
            events: list[tuple[_Row, StreamEvent]] = []
            for i, row in enumerate(rows):
                if row.req.cancelled:
                    continue
                event = row.advance(tokens[i])
                if event is not None:
                    events.append((row, event))
                if not row.done:
                    keep.append(i)
            self._set_active(len(keep))  # before the final events, so consumers see it
            for row, event in events:
                row.req.send(event, final=event.finish_reason is not None)
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished and cancelled rows, cache included
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
            step = torch.tensor([[tokens[i]] for i in keep], device=device)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self._forward(step, mask, positions, cache)
