"""The models a worker keeps loaded: a bounded LRU, so a warm model serves without reloading."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.adapters import WorkerAdapters
from haif.exceptions import AdapterRejected

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable

    from haif.artifacts import ArtifactLoader, PulledArtifact
    from haif.envelope import Adapter
    from haif.runtimes import Runtime
    from haif.telemetry.metrics import WorkerMetrics


@dataclass
class LoadedModel:
    key: str  # "artifact:<ref>", "path:<dir>" or "builtin"
    runtime: Runtime
    artifact: PulledArtifact | None = None
    load_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    adapters: WorkerAdapters | None = None  # LoRA adapters loaded on it (made on first use)

    def hold_adapter(
        self, adapter: Adapter, loader: Callable[[], ArtifactLoader], metrics: WorkerMetrics
    ) -> contextlib.AbstractAsyncContextManager[str]:
        """``adapter`` held loaded on this model (its adapters made on first use).

        Raises:
            AdapterRejected: the model's runtime takes no adapters.
        """
        if self.adapters is None:
            if not self.runtime.supports_adapters:
                raise AdapterRejected(f"model {self.runtime.ctx.model.name!r} does not take LoRA adapters")
            base = self.artifact.manifest_digest if self.artifact is not None else None
            self.adapters = WorkerAdapters(self.runtime.ctx.model, self.runtime, base, loader, metrics)
        return self.adapters.use(adapter)


class LoadedModels:
    """At most ``capacity`` loaded models, least recently used first out."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._models)

    def get(self, key: str) -> LoadedModel | None:
        """The loaded model, now the most recently used; None when it is not loaded."""
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
        return model

    def put(self, model: LoadedModel) -> list[LoadedModel]:
        """Add ``model`` as the most recently used; return what fell out (the caller unloads it)."""
        self._models[model.key] = model
        self._models.move_to_end(model.key)
        evicted = []
        while len(self._models) > self.capacity:
            _, old = self._models.popitem(last=False)
            evicted.append(old)
        return evicted

    def clear(self) -> list[LoadedModel]:
        out = list(self._models.values())
        self._models.clear()
        return out
