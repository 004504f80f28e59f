"""The tiny-llama test model on the torch runtime, for unit tests (built once per session)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from haif.config import ModelConfig
from haif.devmodels import build_tiny_llama
from haif.runtimes.base import RuntimeContext, SamplingParams, StreamEvent
from haif.runtimes.torch import TorchRuntime
from tests.support.aio import run_sync


def model_dir(factory: pytest.TempPathFactory) -> Path:
    """The session's build (shared with every test module that builds it there)."""
    return build_tiny_llama(factory.getbasetemp() / "tiny-llama")


def runtime(path: Path, *, max_prompt_tokens: int = 1024, **model: Any) -> TorchRuntime:
    config = ModelConfig(name="tiny-llama", runtime="torch", path=str(path), **model)
    ctx = RuntimeContext(model=config, model_dir=str(path), device="cpu", max_prompt_tokens=max_prompt_tokens)
    rt = TorchRuntime(ctx)
    run_sync(rt.load())
    return rt


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def events(rt: Any, prompt: Any, params: SamplingParams) -> list[StreamEvent]:
    async with contextlib.aclosing(rt.stream(prompt, params)) as stream:
        return [event async for event in stream]
