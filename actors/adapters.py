"""The LoRA adapters a worker keeps loaded on its runtime: pulled, verified and loaded on
first use, at most ``max_adapters_per_worker`` of them, the least recently used first out.

A request that names an adapter holds it (``use``) while it runs: an adapter in use is
never unloaded. When every loaded adapter is in use and another one is asked for, that
request waits for one to be free (within its deadline) rather than going over the bound:
vLLM's engine is sized for the bound, and the torch runtime's stacks stay small.

What is loaded is checked first (``ArtifactLoader.acquire_adapter``): its manifest signed
by a trusted key, every blob's digest, and that it is an adapter of the very base model
artifact this worker serves. A refusal is the request's error (4xx); nothing is loaded
and the base keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from haif.exceptions import AdapterRejected
from haif.telemetry import tracing

if TYPE_CHECKING:
    from haif.artifacts import ArtifactLoader, PulledArtifact
    from haif.config import ModelConfig
    from haif.envelope import Adapter
    from haif.runtimes import Runtime
    from haif.telemetry.metrics import WorkerMetrics

logger = logging.getLogger("haif.worker")


@dataclass
class LoadedAdapter:
    name: str
    artifact: PulledArtifact
    load_s: float
    users: int = 0


class WorkerAdapters:
    """The adapters loaded on one runtime (one base model version) of a worker.

    Args:
        model: the base model's config (which adapters it serves, how many at once).
        runtime: the loaded base model.
        base_manifest: the digest of the manifest the base was loaded from (None: a model
            served from a plain directory, which takes no adapter).
        loader: the worker's artifact loader (made on first use).
        metrics: where loads, evictions and hits are counted.
    """

    def __init__(
        self,
        model: ModelConfig,
        runtime: Runtime,
        base_manifest: str | None,
        loader: Callable[[], ArtifactLoader],
        metrics: WorkerMetrics,
    ) -> None:
        self._model = model
        self._runtime = runtime
        self._base_manifest = base_manifest
        self._loader = loader
        self._metrics = metrics
        self.capacity = model.max_adapters_per_worker
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._loading = asyncio.Lock()  # one load at a time: the bound holds
        self._released = asyncio.Condition()

    def names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    @contextlib.asynccontextmanager
    async def use(self, adapter: Adapter) -> AsyncIterator[str]:
        """Hold ``adapter`` loaded for the block; yields the name the runtime knows it by.

        Raises:
            AdapterRejected / AdapterNotFound: it is not served here, or failed a check.
        """
        loaded = await self._acquire(adapter)
        loaded.users += 1
        try:
            yield loaded.name
        finally:
            loaded.users -= 1
            async with self._released:
                self._released.notify_all()

    async def _acquire(self, adapter: Adapter) -> LoadedAdapter:
        self._check_served(adapter)
        loaded = self._hit(adapter.name)
        if loaded is not None:
            return loaded
        async with self._loading:
            loaded = self._hit(adapter.name)  # loaded while this request waited
            if loaded is not None:
                return loaded
            await self._make_room()
            # Shielded: a request that goes away mid-load leaves the adapter loaded and
            # recorded, not half-registered in the runtime.
            return await asyncio.shield(self._load(adapter))

    def _hit(self, name: str) -> LoadedAdapter | None:
        loaded = self._loaded.get(name)
        if loaded is not None:
            self._loaded.move_to_end(name)
            self._metrics.adapter_hit()
        return loaded

    def _check_served(self, adapter: Adapter) -> None:
        configured = self._model.adapter(adapter.name)
        if configured is not None and configured.artifact == adapter.artifact:
            return
        if configured is None and self._model.dynamic_adapters and adapter.name == adapter.artifact:
            return
        raise AdapterRejected(f"model {self._model.name!r} does not serve adapter {adapter.name}")

    async def _load(self, adapter: Adapter) -> LoadedAdapter:
        started = time.perf_counter()
        attributes = {tracing.MODEL: self._model.name, tracing.ADAPTER: adapter.name,
                      "haif.artifact": adapter.artifact}
        with tracing.span("worker.load_adapter", attributes=attributes):
            with tracing.span("artifact.pull", attributes={"haif.artifact": adapter.artifact}):
                pulled = await asyncio.to_thread(
                    self._loader().acquire_adapter, adapter.artifact, self._base_manifest
                )
            try:
                with tracing.span("runtime.load_adapter"):
                    await self._runtime.load_adapter(adapter.name, str(pulled.path))
            except BaseException:
                pulled.release()
                raise
        loaded = LoadedAdapter(adapter.name, pulled, time.perf_counter() - started)
        self._loaded[adapter.name] = loaded
        self._metrics.adapter_loaded()
        logger.info(
            "model %s: loaded adapter %s (%s, manifest sha256:%s) in %.3f s", self._model.name,
            adapter.name, adapter.artifact, pulled.manifest_digest[:16], loaded.load_s,
        )
        return loaded

    async def _make_room(self) -> None:
        """Unload least recently used adapters not in use until one more fits; while every
        one is in use, wait for one to be released."""
        while len(self._loaded) >= self.capacity:
            victim = next((a for a in self._loaded.values() if a.users == 0), None)
            if victim is None:
                async with self._released:
                    await self._released.wait()
                continue
            await self._unload(victim)
            self._metrics.adapter_evicted()
            logger.info(
                "model %s: evicted adapter %s (least recently used)", self._model.name, victim.name
            )

    async def _unload(self, loaded: LoadedAdapter) -> None:
        del self._loaded[loaded.name]
        try:
            await self._runtime.unload_adapter(loaded.name)
        finally:
            loaded.artifact.release()

    def release_all(self) -> None:
        """The base model is unloading (its runtime, adapters and all): unpin every adapter."""
        for loaded in self._loaded.values():
            loaded.artifact.release()
        self._loaded.clear()
