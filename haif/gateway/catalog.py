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
from typing import TYPE_CHECKING

from haif.config import ARTIFACT_REF_PATTERN
from haif.envelope import Adapter, ResolvedModel

if TYPE_CHECKING:
    from collections.abc import Collection

    from haif.config import HaifConfig, ModelConfig


class ModelCatalog:
    """The served names of one config: one per Gateway replica, owned by its admission,
    the one place a request's ``model`` is resolved (``resolve``)."""

    def __init__(self, config: HaifConfig) -> None:
        self._models = {m.name: m for m in config.models if m.enabled}
        self._names: dict[str, tuple[ModelConfig, Adapter | None]] = {}
        for model in self._models.values():
            self._names[model.name] = (model, None)
            for adapter in model.adapters:
                served = (model, Adapter(adapter.name, adapter.artifact))
                self._names[f"{model.name}:{adapter.name}"] = self._names[adapter.name] = served

    def resolve(self, name: str) -> ResolvedModel | None:
        """What ``name`` serves (on the base's configured version), or None when nothing does."""
        found = self._lookup(name)
        if found is None:
            return None
        model, adapter = found
        return ResolvedModel(name, model.name, adapter, model.version)

    def model(self, resolved: ResolvedModel) -> ModelConfig:
        """The configured base of ``resolved`` (one of this catalog's answers)."""
        return self._models[resolved.base]

    def _lookup(self, name: str) -> tuple[ModelConfig, Adapter | None] | None:
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
    def _on_demand(model: ModelConfig, ref: str) -> tuple[ModelConfig, Adapter | None] | None:
        if re.fullmatch(ARTIFACT_REF_PATTERN, ref) is None:
            return None
        for adapter in model.adapters:  # a configured one, named by its artifact: the same one
            if adapter.artifact == ref:
                return model, Adapter(adapter.name, adapter.artifact)
        return model, Adapter(ref, ref)

    def permits(self, allowed: Collection[str] | None, name: str | ResolvedModel | None) -> bool:
        """Whether a token limited to ``allowed`` (None: every model) may use ``name``: a
        name, or what ``resolve`` made of one (None: a name that serves nothing)."""
        if allowed is None:
            return True
        if isinstance(name, str):
            if name in allowed:
                return True
            name = self.resolve(name)
        if name is None:
            return False
        if name.requested in allowed:
            return True
        if name.adapter is None:
            return name.base in allowed
        names = {name.served, f"{name.base}:*"}
        if self._models[name.base].adapter(name.adapter.name) is not None:
            names.add(name.adapter.name)
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
