"""What a client may name in ``model``: every enabled model, and the LoRA adapters on it.

An adapter is requested as ``BASE:ADAPTER`` (Ray Serve LLM's form), or by its served name
alone when the config names it (``models[].adapters``). A model with ``dynamic_adapters``
also serves any trusted adapter artifact of its own artifact on demand:
``BASE:<artifact name:version>`` or ``BASE:sha256:<manifest digest>``; whether the
artifact exists, is signed by a trusted key and was trained on this base is the worker's
check, when it loads it.

A token's ``--models`` list may name an adapter (``BASE:ADAPTER``, or its served name), or
every adapter of a base (``BASE:*``); naming the base alone does not grant its adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from haif.config import ARTIFACT_REF_PATTERN
from haif.envelope import Adapter

if TYPE_CHECKING:
    from collections.abc import Collection

    from haif.config import HaifConfig, ModelConfig


@dataclass(frozen=True)
class Served:
    """A name a client sent, resolved: the model that runs it and the adapter, if any."""

    model: ModelConfig
    adapter: Adapter | None = None

    @property
    def id(self) -> str:
        return self.model.name if self.adapter is None else f"{self.model.name}:{self.adapter.name}"


class ModelCatalog:
    """The served names of one config (every Gateway replica builds its own)."""

    def __init__(self, config: HaifConfig) -> None:
        self._models = {m.name: m for m in config.models if m.enabled}
        self._names: dict[str, Served] = {}
        for model in self._models.values():
            self._names[model.name] = Served(model)
            for adapter in model.adapters:
                served = Served(model, Adapter(adapter.name, adapter.artifact))
                self._names[served.id] = self._names[adapter.name] = served

    def resolve(self, name: str) -> Served | None:
        """What ``name`` serves, or None when nothing does."""
        found = self._names.get(name)
        if found is not None:
            return found
        # A model name may hold ":" itself: try every split, the longest base first.
        cut = name.rfind(":")
        while cut > 0:
            model = self._models.get(name[:cut])
            if model is not None and model.dynamic_adapters:
                return self._on_demand(model, name[cut + 1 :])
            cut = name.rfind(":", 0, cut)
        return None

    @staticmethod
    def _on_demand(model: ModelConfig, ref: str) -> Served | None:
        if re.fullmatch(ARTIFACT_REF_PATTERN, ref) is None:
            return None
        for adapter in model.adapters:  # a configured one, named by its artifact: the same one
            if adapter.artifact == ref:
                return Served(model, Adapter(adapter.name, adapter.artifact))
        return Served(model, Adapter(ref, ref))

    def permits(self, allowed: Collection[str] | None, name: str) -> bool:
        """Whether a token limited to ``allowed`` (None: every model) may use ``name``."""
        if allowed is None or name in allowed:
            return True
        served = self.resolve(name)
        if served is None:
            return False
        if served.adapter is None:
            return served.model.name in allowed
        names = {served.id, f"{served.model.name}:*"}
        if served.model.adapter(served.adapter.name) is not None:
            names.add(served.adapter.name)
        return not names.isdisjoint(allowed)

    def listed(self, allowed: Collection[str] | None) -> list[tuple[str, str | None]]:
        """``(id, parent)`` of every model and configured adapter ``allowed`` may use, in
        config order, each adapter after its base (adapters served on demand are not listed)."""
        out: list[tuple[str, str | None]] = []
        for model in self._models.values():
            if self.permits(allowed, model.name):
                out.append((model.name, None))
            for adapter in model.adapters:
                served_id = f"{model.name}:{adapter.name}"
                if self.permits(allowed, served_id):
                    out.append((served_id, model.name))
        return out
