"""Model runtimes behind one interface (see ``base.Runtime``). Heavy imports are lazy."""

from __future__ import annotations

import importlib

from haif.exceptions import ConfigError
from haif.runtimes.base import (
    EmbeddingOutput,
    GenerationOutput,
    Runtime,
    RuntimeContext,
    SamplingParams,
    StreamEvent,
)

_RUNTIMES = {
    "echo": ("haif.runtimes.echo", "EchoRuntime"),
    "torch": ("haif.runtimes.torch", "TorchRuntime"),
    "embeddings": ("haif.runtimes.embeddings", "EmbeddingsRuntime"),
    "vllm": ("haif.runtimes.vllm", "VllmRuntime"),
}

__all__ = [
    "EmbeddingOutput",
    "GenerationOutput",
    "Runtime",
    "RuntimeContext",
    "SamplingParams",
    "StreamEvent",
    "create_runtime",
]


def create_runtime(ctx: RuntimeContext) -> Runtime:
    """Instantiate (not load) the runtime the model's config names.

    Raises:
        ConfigError: the runtime is unknown or its package is not installed.
    """
    name = ctx.model.runtime
    try:
        module_name, class_name = _RUNTIMES[name]
    except KeyError:
        raise ConfigError(f"unknown runtime {name!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"runtime {name!r} of model {ctx.model.name!r} is not available: {exc}"
        ) from exc
    return getattr(module, class_name)(ctx)
