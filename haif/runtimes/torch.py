"""The torch runtime: a Hugging Face causal LM run by transformers, with dynamic batching.

``stream`` tokenizes the prompt, checks its limits, and queues the request. One batching
loop per event loop takes up to ``torch.max_batch_size`` queued requests, waiting at most
``torch.max_wait_ms`` after the first arrived, and generates for the whole batch step by step
in a single worker thread: left-padded prompts with an attention mask and explicit
position ids, one KV cache for the batch, per-row sampling, stop and length checks.
Each new token's text goes back to its request's queue as soon as it is produced.
Requests that arrive while a batch runs wait for the next batch; rows that finish or
whose consumer goes away are dropped from the batch (and its cache) at the next step.
Penalties, logit bias, ``min_tokens``, grammars (``response_format``, forced tool calls)
and logprobs are applied per row (``haif.runtimes.sampling``, ``haif.runtimes.grammar``):
each request of a batch keeps its own parameters. A request may name a loaded LoRA
adapter: requests for different adapters and for the base share a batch, each row's
adapter applied inside the forward (``haif.runtimes.lora``).

torch and transformers are imported only when a model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from haif.exceptions import (
    AdapterRejected,
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
    Prompt,
    Runtime,
    RuntimeContext,
    SamplingParams,
    StreamEvent,
    quiet_transformers,
)
from haif.runtimes.batching import Batcher, QueuedRequest
from haif.runtimes.sequence import GeneratedSequence, IncrementalDecoder, prompt_logprobs

if TYPE_CHECKING:
    import torch

    from haif.runtimes.grammar import GrammarCompiler
    from haif.runtimes.lora import BatchedLora
    from haif.runtimes.sampling import BatchSampler

# The decoder's old name, kept for the tests and benchmarks that import it from here.
_IncrementalDecoder = IncrementalDecoder

logger = logging.getLogger(__name__)


class TorchRuntime(Runtime):
    """A transformers causal LM with dynamic batching (see the module docstring)."""

    name = "torch"
    capabilities = frozenset({"generate"})
    supports_adapters = True

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._bos_id: int | None = None
        self._pad_id = 0
        self._vocab_size = 0
        self._texts: hf.TokenTexts | None = None
        self._grammar: GrammarCompiler | None = None  # built on the first guided request
        self._compiling: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._forward_kwargs: dict[str, Any] = {}
        self._cache_kw = "cache"
        self._new_cache: Callable[[], Any] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lora: BatchedLora | None = None  # made when the first adapter loads
        self._batcher: Batcher | None = None
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

        if self.ctx.model.torch.threads:
            torch.set_num_threads(self.ctx.model.torch.threads)
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
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._texts = hf.TokenTexts(tokenizer)
        self._grammar = None
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
        self._model = self._tokenizer = self._lora = None
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

    def render_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        return hf.render_chat(self._require_loaded(), messages, self.ctx.model.name, tools)

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids as generation sees them (with at most one BOS); token ids
        are checked against the vocabulary.

        Raises:
            InvalidRequest: a token id is not in the vocabulary.
        """
        ids = hf.encode_prompt(self._require_loaded(), prompt, self._bos_id)
        if not isinstance(prompt, str):
            hf.check_token_ids(ids, self._vocab_size, "prompt")
        return ids

    async def _compiled(self, params: SamplingParams) -> Any:
        """The compiled grammar of the request's guide (None without one); compiled off the
        event loop the first time a schema is seen, from the cache after that."""
        if params.guide is None:
            return None
        if self._grammar is None:
            from haif.runtimes.grammar import GrammarCompiler

            self._grammar = GrammarCompiler(self._tokenizer, self._vocab_size, self._eos_ids)
        found = self._grammar.cached(params.guide)
        if found is not None:
            return found
        loop = asyncio.get_running_loop()
        if self._compiling is None or self._compiling[0] is not loop:  # a lock per event loop
            self._compiling = (loop, asyncio.Lock())
        async with self._compiling[1]:  # requests with a new schema at once: compiled once
            return await asyncio.to_thread(self._grammar.compile, params.guide)

    async def stream(
        self, prompt: Prompt, params: SamplingParams, *, adapter: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        if adapter is not None and adapter not in self.adapters():
            raise AdapterRejected(f"adapter {adapter} is not loaded on model {self.ctx.model.name!r}")
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty and the model has no BOS token")
        self.check_prompt(len(prompt_ids), params.max_tokens)
        for what, ids in params.token_ids().items():
            hf.check_token_ids(ids, self._vocab_size, what)
        grammar = await self._compiled(params)
        if params.max_tokens <= 0:
            yield StreamEvent("", 0, len(prompt_ids), "length")
            return
        loop = asyncio.get_running_loop()
        batcher = self._batcher_for(loop)
        echo = "" if not params.echo else prompt if isinstance(prompt, str) else self._tokenizer.decode(
            prompt_ids, skip_special_tokens=True
        )
        req = QueuedRequest(prompt_ids, params, loop, loop.time(), grammar=grammar, echo_text=echo, adapter=adapter)
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

    def _batcher_for(self, loop: asyncio.AbstractEventLoop) -> Batcher:
        batcher = self._batcher
        # One loop per event loop (a worker has one; tests run several in turn), and a
        # fresh one if the last died (its requests were failed by its done callback).
        if batcher is None or batcher.loop is not loop or batcher.task.done():
            batcher = self._batcher = Batcher(
                self.ctx.model, loop, self._run_in_executor, self._record_batch,
                lambda: self._bump("failed_batches"),
            )
        return batcher

    # --- LoRA adapters (haif.runtimes.lora) ------------------------------------------------

    def adapters(self) -> list[str]:
        """The LoRA adapters loaded on the base weights."""
        return self._lora.names() if self._lora is not None else []

    async def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT LoRA directory ``path`` as ``name``, between two batches.

        Raises:
            AdapterRejected: it does not fit the base model; nothing was loaded.
        """
        await self._between_batches(lambda lora: lora.load(name, path))

    async def unload_adapter(self, name: str) -> None:
        await self._between_batches(lambda lora: lora.unload(name))

    async def _between_batches(self, change: Callable[[BatchedLora], None]) -> None:
        # On the batches' own thread: the stacks never change under a running forward.
        from haif.runtimes.lora import BatchedLora

        model, executor = self._model, self._executor
        if model is None or executor is None:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        if self._lora is None:
            self._lora = BatchedLora(model)  # wraps nothing until an adapter loads
        await asyncio.get_running_loop().run_in_executor(executor, change, self._lora)

    def _lora_rows(self, reqs: Sequence[QueuedRequest]) -> contextlib.AbstractContextManager[None]:
        if self._lora is None:
            return contextlib.nullcontext()
        return self._lora.rows([req.adapter for req in reqs], self._device)

    # --- the worker thread ----------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, reqs: Sequence[QueuedRequest]) -> torch.Tensor:
        with self._lora_rows(reqs):  # each row's adapter, if any
            out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=True, **{self._cache_kw: cache}, **self._forward_kwargs)
        return out.logits[:, -1, :]

    async def _run_in_executor(self, reqs: list[QueuedRequest]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, reqs)

    def _run_batch(self, reqs: list[QueuedRequest]) -> None:
        """Generate for ``reqs`` until every row is finished or cancelled."""
        import torch

        try:
            with torch.inference_mode():
                self._generate(reqs)
        finally:
            self._set_active(0)

    def _sampler(self, reqs: list[QueuedRequest]) -> tuple[list[GeneratedSequence], BatchSampler]:
        from haif.runtimes import grammar, sampling

        states = [
            sampling.RowState(
                req.params, req.prompt_ids, self._eos_ids | frozenset(req.params.stop_token_ids),
                matcher=grammar.Matcher(req.grammar) if req.grammar is not None else None,
            )
            for req in reqs
        ]
        guided = any(state.matcher is not None for state in states)
        mask = grammar.BatchMask(len(reqs), self._vocab_size) if guided else None
        rows = [
            GeneratedSequence(state, len(req.prompt_ids), self._tokenizer, self._texts, self._eos_ids)
            for state, req in zip(states, reqs, strict=True)
        ]
        return rows, sampling.BatchSampler(states, self._vocab_size, self._device, mask)

    def _echo(self, req: QueuedRequest) -> None:
        """Send the prompt back first (``echo``), with its tokens' logprobs when asked."""
        import torch

        entries: tuple[Any, ...] = ()
        k = req.params.logprobs
        if k is not None:
            ids = req.prompt_ids
            # The prompt alone, every position's logits: only for the rows that ask.
            with self._lora_rows([req]):  # its adapter's distribution, if it has one
                logits = self._model(input_ids=torch.tensor([ids], device=self._device)).logits[0]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)
            chosen = logp.gather(1, torch.tensor(ids[1:], device=self._device).unsqueeze(1)).squeeze(1)
            top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
            top = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
            entries = prompt_logprobs(self._tokenizer, self._texts, ids, chosen.tolist(), top)
        req.send(StreamEvent(req.echo_text, 0, len(req.prompt_ids), logprobs=entries))

    def _generate(self, reqs: list[QueuedRequest]) -> None:
        import torch

        device = self._device
        rows, sampler = self._sampler(reqs)
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
        for req in reqs:
            if req.params.echo and not req.cancelled:
                self._echo(req)
        wants_logprobs = any(req.params.logprobs is not None for req in reqs)
        raw = self._forward(ids, mask, positions, cache, reqs)
        while True:
            # Processors change the logits in place; logprobs are the raw distribution's.
            logits = sampler.process(raw.float().clone() if wants_logprobs else raw.float())
            tokens = sampler.sample(logits)
            accepted = sampler.accept(tokens)
            logprobs = sampler.logprobs(raw, tokens) if wants_logprobs else [None] * len(rows)
            if self._closing:
                reason = WorkerUnavailable(f"model {self.ctx.model.name!r} is unloading")
                for req in reqs:
                    req.send(reason, final=True)
                return
            keep: list[int] = []
            events: list[tuple[QueuedRequest, StreamEvent]] = []
            for i, (row, req) in enumerate(zip(rows, reqs, strict=True)):
                if req.cancelled:
                    continue
                event = row.advance(tokens[i], logprobs[i]) if accepted[i] else row.refuse()
                if not accepted[i]:
                    logger.warning("model %r: a grammar refused a token it allowed", self.ctx.model.name)
                if event is not None:
                    events.append((req, event))
                if not row.done:
                    keep.append(i)
            self._set_active(len(keep))  # before the final events, so consumers see it
            for req, event in events:
                req.send(event, final=event.finish_reason is not None)
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished and cancelled rows, cache included
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
                reqs = [reqs[i] for i in keep]
                sampler.select(keep)
            step = torch.tensor([[tokens[i]] for i in keep], device=device)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            raw = self._forward(step, mask, positions, cache, reqs)
