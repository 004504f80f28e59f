"""The model worker: a Ray actor that owns one loaded runtime.

The Orchestrator creates workers (detached, named actors it adopts again after a
restart) with ``num_gpus=1`` when the model runs on a GPU, so Ray pins each worker to
its own device (``CUDA_VISIBLE_DEVICES``); CPU workers reserve ``num_cpus``. Gateways
call it directly: one Ray call per request, one Ray streaming call per stream. A worker loads its model once, then serves any number of
concurrent requests from its event loop (an async actor); streaming methods are
Ray streaming generators, and cancelling one (client gone, deadline) stops the
generation in the runtime.

A model given as an ``artifact`` is loaded only through the artifact store: pulled into
the node cache, its manifest signature and every blob digest verified, then loaded from
a directory of the cache. A failed check refuses the model (``ArtifactRejected``); there
is no fallback to unverified bytes. Loaded models stay in a bounded LRU
(``artifacts.loaded_models_max``): loading one that is still there is instant.
A request may name a LoRA adapter of the model: loaded on first use, verified the same way
and against the base's manifest (``actors.adapters``); the health probe reports the loaded
ones, so that the Gateways send an adapter's requests where it is warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from actors.loaded import LoadedModel, LoadedModels
from haif.config import CPU_STREAM_PIECES_PER_S
from haif.envelope import EmbeddingResult
from haif.exceptions import (
    ConfigError,
    DeadlineExceeded,
    HaifError,
    InternalError,
    ModelLoadFailed,
    ModelNotReady,
    UnprocessableRequest,
    WorkerDraining,
)
from actors.params import generation
from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from haif.runtimes import RuntimeContext, SamplingParams, create_runtime
from haif.runtimes.base import GenerationOutput, Prompt, StreamEvent, StreamTally, usage_of
from haif.runtimes.streams import coalesce, merge_choices
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs
from haif.telemetry.metrics import ProcessMetrics, WorkerMetrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from haif.artifacts import ArtifactLoader

    from haif.config import ArtifactsConfig, ModelConfig, TelemetryConfig
    from haif.envelope import WorkItem
    from haif.runtimes import Runtime
    from haif.telemetry.metrics import MetricsTarget

logger = logging.getLogger("haif.worker")

_TORCH_RUNTIMES = frozenset({"torch", "embeddings", "vllm"})
# However many streams share a worker's piece budget, a stream sends a piece at least this often.
MAX_PIECE_INTERVAL_S = 1.0


def _pick_device(runtime: str, gpu_ids: list[Any]) -> str:
    if not gpu_ids or runtime not in _TORCH_RUNTIMES:
        return "cpu"
    import torch  # lazy: only GPU-capable runtimes pay for it

    if torch.cuda.is_available():
        return "cuda"
    # Logical GPUs (a test cluster declaring num_gpus) without a CUDA device.
    logger.warning("worker holds GPU ids %s but CUDA is unavailable; running on CPU", gpu_ids)
    return "cpu"


class ModelWorker:
    """One model, loaded once, served concurrently."""

    def __init__(
        self,
        model: ModelConfig,
        max_prompt_tokens: int,
        base_dir: str,
        worker_id: str,
        artifacts: ArtifactsConfig | None = None,
        metrics: MetricsTarget | None = None,
        telemetry: TelemetryConfig | None = None,
    ):
        if telemetry is not None:
            tracing.setup_tracing(telemetry, "worker", instance=worker_id)
            install_json_logs(telemetry, "worker")
        self.model = model
        # The slot it fills and the actor that fills it, as the routing table names it.
        # Outside Ray (a remote P2P worker, `haif p2p worker`) no Ray call is made: Ray's
        # accessors would start a local Ray instance of their own.
        self._in_ray = ray.is_initialized()
        actor_id = ray.get_runtime_context().get_actor_id() if self._in_ray else None
        self.worker_id = f"{worker_id}#{actor_id[:8]}" if actor_id else worker_id
        self._load_lock = asyncio.Lock()  # every Orchestrator replica may ask it to load
        self._failed_loads: dict[str, ModelLoadFailed] = {}
        self._base_dir = base_dir
        self._max_prompt_tokens = max_prompt_tokens
        self._object_ref_threshold = 64 * 1024
        self._artifacts = artifacts
        self._loader: ArtifactLoader | None = None
        self._loaded = LoadedModels(artifacts.loaded_models_max if artifacts is not None else 1)
        self._current: LoadedModel | None = None
        self._last_load_warm = False
        self._runtime: Runtime | None = None
        self._state = "created"
        self._error: str | None = None
        self._device = "cpu"
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()  # set while nothing is in flight (a drain waits for it)
        self._idle.set()
        self._streams = 0  # streams in flight: they share the model's stream_pieces_per_s
        self._served = 0
        self._cancelled = 0
        self._started = time.time()
        self._metrics = WorkerMetrics(ProcessMetrics.start(metrics, "worker"), model.name)
        self._metrics.watch_in_flight(lambda: self._in_flight)

    # --- lifecycle --------------------------------------------------------------------

    async def load(
        self, object_ref_threshold_bytes: int = 64 * 1024, artifact: str | None = None
    ) -> dict[str, Any]:
        """Load the model, or make ``artifact`` (another version of it) the one served.

        A model still in this worker's LRU of loaded models is served at once. A failed
        load raises ModelLoadFailed (ArtifactRejected when the bytes fail a check) and
        leaves the worker as it was: never half-loaded, never on unverified bytes.

        Every Orchestrator replica that adopts this worker asks it to load: the calls are
        serialized, and a load that failed answers its failure again without another try
        (a new worker tries again; the same bytes would be refused the same way).
        """
        async with self._load_lock:
            return await self._load_target(object_ref_threshold_bytes, artifact)

    def _key(self, artifact: str | None) -> tuple[str, str | None]:
        target = artifact or self.model.artifact
        if target is not None:
            return f"artifact:{target}", target
        return (f"path:{self.model.path}" if self.model.path else "builtin"), None

    async def _load_target(self, object_ref_threshold_bytes: int, artifact: str | None) -> dict[str, Any]:
        self._object_ref_threshold = object_ref_threshold_bytes
        key, target = self._key(artifact)
        failed = self._failed_loads.get(key)
        if failed is not None:
            raise failed
        warm = self._loaded.get(key)
        if warm is not None:
            self._activate(warm, warm=True)
            return self.info()
        attributes = {
            tracing.MODEL: self.model.name, tracing.WORKER: self.worker_id, "haif.artifact": target
        }
        with tracing.span("worker.load_model", attributes=attributes):
            try:
                return await self._load(key, target)
            except ModelLoadFailed as exc:
                self._failed_loads[key] = exc
                raise

    async def _load(self, key: str, target: str | None) -> dict[str, Any]:
        self._state = "loading"
        started = time.perf_counter()
        pulled = None
        try:
            self._device = _pick_device(self.model.runtime, self._gpu_ids())
            model_dir = None
            if target is not None:
                with tracing.span("artifact.pull", attributes={"haif.artifact": target}) as span:
                    pulled = await asyncio.to_thread(self._artifact_loader().acquire, target)
                    _pulled(span, pulled.summary())
                self._metrics.artifact_pulled(pulled.blobs_hit, pulled.blobs_fetched)
                model_dir = str(pulled.path)
            elif self.model.path is not None:
                path = self.model.resolved_path(Path(self._base_dir))
                if not path.is_dir():
                    raise ModelLoadFailed(
                        f"model {self.model.name!r}: directory {path} does not exist"
                    )
                model_dir = str(path)
            ctx = RuntimeContext(
                model=self.model,
                model_dir=model_dir,
                device=self._device,
                max_prompt_tokens=self._max_prompt_tokens,
            )
            runtime = create_runtime(ctx)
            with tracing.span("runtime.load", attributes={"haif.runtime": self.model.runtime}):
                await runtime.load()
        except HaifError as exc:
            self._load_failed(exc.message, pulled)
            cls = type(exc) if isinstance(exc, ModelLoadFailed) else ModelLoadFailed
            raise cls(f"model {self.model.name!r} failed to load: {exc.message}") from exc
        except Exception as exc:  # any loader failure must surface as a typed, named error
            self._load_failed(f"{type(exc).__name__}: {exc}", pulled)
            logger.exception("model %s failed to load", self.model.name)
            raise ModelLoadFailed(
                f"model {self.model.name!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        load_s = time.perf_counter() - started
        loaded = LoadedModel(key=key, runtime=runtime, artifact=pulled, load_s=load_s)
        for old in self._loaded.put(loaded):
            await self._unload_one(old)
        self._activate(loaded, warm=False)
        return self.info()

    def _artifact_loader(self) -> ArtifactLoader:
        if self._artifacts is None:
            raise ConfigError(
                f"model {self.model.name!r} names an artifact; the worker has no artifacts config"
            )
        if self._loader is None:
            from haif.artifacts import ArtifactLoader  # lazy: fsspec, cryptography

            self._loader = ArtifactLoader(self._artifacts, Path(self._base_dir), self.model.name)
        return self._loader

    def _activate(self, loaded: LoadedModel, *, warm: bool) -> None:
        self._current = loaded
        self._runtime = loaded.runtime
        self._state, self._error = "ready", None
        self._last_load_warm = warm

    def _load_failed(self, message: str, pulled: Any) -> None:
        if pulled is not None:
            pulled.release()
        # A worker that already serves a model keeps serving it.
        self._state = "ready" if self._current is not None else "failed"
        self._error = message

    @staticmethod
    async def _unload_one(loaded: LoadedModel) -> None:
        try:
            await loaded.runtime.unload()
        finally:
            if loaded.adapters is not None:
                loaded.adapters.release_all()
            if loaded.artifact is not None:
                loaded.artifact.release()

    async def unload(self) -> None:
        self._runtime, self._current = None, None
        self._state = "unloaded"
        for loaded in self._loaded.clear():
            await self._unload_one(loaded)

    def _gpu_ids(self) -> list[Any]:
        if self._in_ray:
            return ray.get_gpu_ids()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return [g for g in visible.split(",") if g.strip()]

    def info(self) -> dict[str, Any]:
        """Placement and load facts (used by health checks, routing and tests)."""
        stats_fn = getattr(self._runtime, "stats", None)
        current = self._current
        return {
            "worker_id": self.worker_id,
            "model": self.model.name,
            "state": self._state,
            "error": self._error,
            "device": self._device,
            "gpu_ids": [str(g) for g in self._gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node_id": ray.get_runtime_context().get_node_id() if self._in_ray else None,
            "pid": os.getpid(),
            "in_flight": self._in_flight,
            "served": self._served,
            "cancelled": self._cancelled,
            "runtime_stats": stats_fn() if callable(stats_fn) else {},
            "artifact": current.artifact.summary() if current and current.artifact else None,
            "loaded": self._loaded.keys(),
            "adapters": self._adapter_names(),
            "load_s": round(current.load_s, 4) if current else None,
            "warm": self._last_load_warm,
            "artifact_events": list(self._loader.events.recent) if self._loader else [],
        }

    # --- serving ---------------------------------------------------------------------

    def _ready_runtime(self) -> Runtime:
        if self._runtime is None:
            raise ModelNotReady(f"model {self.model.name!r} is not loaded on {self.worker_id}")
        return self._runtime

    @staticmethod
    async def _body(item: WorkItem) -> Any:
        return await item.body if item.by_reference else item.body

    def _request(self, runtime: Runtime, body: Any, max_tokens: int) -> tuple[list[Prompt], SamplingParams]:
        if not isinstance(body, (CompletionRequest, ChatCompletionRequest)):
            raise UnprocessableRequest(f"model {self.model.name!r} generates text; use /v1/embeddings elsewhere")
        return generation(runtime, body, max_tokens)

    async def drain(self, timeout_s: float) -> int:
        """Take no new request from now on (they are refused with ``WorkerDraining``, before
        any work, and the Gateway sends them to another worker); wait up to ``timeout_s`` for
        the ones in flight to finish. Returns how many are still running then (0: drained)."""
        if not self._draining:
            logger.info("worker %s: draining (%d in flight)", self.worker_id, self._in_flight)
        self._draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._in_flight

    def ping(self) -> tuple[str, int, list[str]]:
        """The Orchestrator's health probe: cheap, answered even while requests run; the
        in-flight count is the load the routing table reports to every Gateway, the loaded
        LoRA adapters where it sends their requests first."""
        state = "draining" if self._draining else self._state
        if state == "ready" and self._current is not None and self._current.runtime.dead() is not None:
            state = "dead"  # loaded, but its engine died: the Orchestrator replaces it
        return state, self._in_flight, self._adapter_names()

    def _adapter_names(self) -> list[str]:
        current = self._current
        return current.adapters.names() if current is not None and current.adapters is not None else []

    def _adapter(self, item: WorkItem) -> contextlib.AbstractAsyncContextManager[str | None]:
        """Hold the request's LoRA adapter loaded while it runs (nothing when it names none)."""
        if item.adapter is None or self._current is None:
            return contextlib.nullcontext()
        return self._current.hold_adapter(item.adapter, self._artifact_loader, self._metrics)

    @contextlib.contextmanager
    def _serving(self, item: WorkItem, what: str) -> Iterator[Span]:
        """Trace the request and count it in flight; let HAIF errors through, turn others
        into InternalError. A request whose deadline has passed is refused before any work."""
        item.ctx.remaining_s()
        if self._draining:
            raise WorkerDraining(f"worker {self.worker_id} is draining; the request goes to another worker")
        if item.ctx.sent_at is not None:  # from the Gateway's hand-off to this call
            tracing.record_span("worker.queue_wait", item.ctx, item.ctx.sent_at, attributes={
                tracing.WORKER: self.worker_id, "haif.in_flight": self._in_flight,
            })
        attributes = {
            tracing.MODEL: self.model.name,
            tracing.MODEL_VERSION: self.model.version,
            tracing.ADAPTER: item.adapter.name if item.adapter is not None else None,
            tracing.WORKER: self.worker_id,
        }
        with tracing.span(f"worker.{what}", item.ctx, attributes=attributes) as span:
            self._in_flight += 1
            self._idle.clear()
            try:
                yield span
                logger.debug("%s served on %s", what, self.worker_id)
            except HaifError:
                raise
            except Exception as exc:
                logger.exception("%s failed for request %s", what, item.ctx.request_id)
                raise InternalError(f"worker {self.worker_id} failed: {type(exc).__name__}") from exc
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

    async def generate(self, item: WorkItem) -> list[GenerationOutput]:
        """Complete every prompt of the request: ``n`` outputs per prompt, prompt by prompt."""
        with self._serving(item, "generate") as span:
            runtime = self._ready_runtime()
            body = await self._body(item)
            # Concurrently, so that the runtime can batch the prompts of one request;
            # past the deadline the work is cancelled here too, not only by the caller.
            with tracing.span("runtime.generate") as generating:
                prompts, params = self._request(runtime, body, item.max_tokens)
                choices = [params.for_choice(i) for i in range(item.n_choices)]
                async with self._adapter(item) as adapter:
                    work = asyncio.gather(
                        *(runtime.generate(p, c, adapter=adapter) for p in prompts for c in choices)
                    )
                    outputs = list(await _within_deadline(work, item))
                prompt_tokens, completion_tokens = usage_of(outputs, item.n_choices)
                _usage(generating, prompt_tokens, completion_tokens)
            _usage(span, prompt_tokens, completion_tokens)
            self._served += 1
            return outputs

    async def generate_stream(self, item: WorkItem) -> AsyncIterator[StreamEvent]:
        """Stream the completion of a single-prompt request, one event per decoded piece
        (of one of its ``n`` choices, each a stream of its own, merged as they come)."""
        finished = False
        held = contextlib.AsyncExitStack()  # the LoRA adapter, for the whole stream
        with self._serving(item, "stream") as span:
            try:
                runtime = self._ready_runtime()
                adapter = await held.enter_async_context(self._adapter(item))
                body = await self._body(item)
                (prompt,), params = self._request(runtime, body, item.max_tokens)
                n = item.n_choices
                tally: StreamTally | None = None
                with tracing.span("runtime.stream") as streaming:
                    started = time.time()
                    # aclosing: a cancelled consumer must free the runtime's batch slot now,
                    # not whenever the generator happens to be garbage-collected.
                    # coalesce: tokens that pile up while the hops downstream are busy, or
                    # within the model's stream_batch_ms, travel together as one Ray object.
                    streams = [
                        coalesce(self._stream(runtime, prompt, params.for_choice(i), adapter),
                                 self._piece_interval_s)
                        for i in range(n)
                    ]
                    pieces = streams[0] if n == 1 else merge_choices(streams)
                    self._streams += n  # each choice's pieces count against the budget
                    try:
                        async with contextlib.aclosing(pieces) as events:
                            async for event in events:
                                if tally is None:
                                    tracing.record_span("runtime.first_token", streaming, started)
                                    tally = StreamTally(n)
                                tally.add(event)
                                yield event
                    finally:
                        self._streams -= n
                        if tally is not None:
                            _usage(streaming, tally.prompt_tokens, tally.completion_tokens)
                            _usage(span, tally.prompt_tokens, tally.completion_tokens)
                finished = True
                self._served += 1
            finally:
                await held.aclose()
                if not finished:
                    self._cancelled += 1

    @staticmethod
    def _stream(
        runtime: Runtime, prompt: Prompt, params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[StreamEvent]:
        if adapter is None:  # only runtimes with supports_adapters take the keyword
            return runtime.stream(prompt, params)
        return runtime.stream(prompt, params, adapter=adapter)  # type: ignore[call-arg]

    def _piece_interval_s(self) -> float:
        """How far apart one stream's pieces leave: the model's ``stream_batch_ms``, widened
        so that all of this worker's streams together send at most ``stream_pieces_per_s``
        pieces a second (never beyond ``MAX_PIECE_INTERVAL_S``)."""
        interval = self.model.stream_batch_ms / 1000
        budget = self.pieces_per_s
        if budget:
            interval = max(interval, self._streams / budget)
        return min(interval, MAX_PIECE_INTERVAL_S)

    @property
    def pieces_per_s(self) -> float:
        """The model's ``stream_pieces_per_s``; unset, a bound on CPU workers only."""
        if self.model.stream_pieces_per_s is not None:
            return self.model.stream_pieces_per_s
        return CPU_STREAM_PIECES_PER_S if self._device == "cpu" else 0.0

    async def embed(self, item: WorkItem) -> EmbeddingResult:
        with self._serving(item, "embed") as span:
            runtime = self._ready_runtime()
            body = await self._body(item)
            if not isinstance(body, EmbeddingRequest):
                raise UnprocessableRequest(f"model {self.model.name!r} only produces embeddings")
            inputs = {"haif.inputs": item.n_inputs}
            with tracing.span("runtime.embed", attributes=inputs) as embedding:
                output = await _within_deadline(runtime.embed(body.inputs()), item)
                _usage(embedding, output.prompt_tokens, 0)
            _usage(span, output.prompt_tokens, 0)
            vectors: Any = output.vectors
            if body.dimensions is not None and body.dimensions != vectors.shape[1]:
                raise UnprocessableRequest(
                    f"model {self.model.name!r} produces {vectors.shape[1]} dimensions; "
                    f"'dimensions'={body.dimensions} is not supported"
                )
            if vectors.nbytes >= self._object_ref_threshold:
                vectors = ray.put(vectors) if self._in_ray else vectors
            self._served += 1
            return EmbeddingResult(model=self.model.name, vectors=vectors, prompt_tokens=output.prompt_tokens)


async def _within_deadline(work: Any, item: WorkItem) -> Any:
    try:
        return await asyncio.wait_for(work, timeout=item.ctx.remaining_s())
    except TimeoutError:
        raise DeadlineExceeded(f"request {item.ctx.request_id} passed its deadline") from None


def _usage(span: Span, prompt_tokens: int, completion_tokens: int) -> None:
    tracing.set_attributes(
        {tracing.PROMPT_TOKENS: prompt_tokens, tracing.COMPLETION_TOKENS: completion_tokens}, span
    )


def _pulled(span: Span, summary: dict[str, Any]) -> None:
    tracing.set_attributes(
        {
            "haif.artifact.manifest_digest": summary["manifest_digest"],
            "haif.artifact.blobs_hit": summary["blobs_hit"],
            "haif.artifact.blobs_fetched": summary["blobs_fetched"],
            "haif.artifact.bytes_fetched": summary["bytes_fetched"],
            "haif.artifact.manifest_from_cache": summary["manifest_from_cache"],
        },
        span,
    )
