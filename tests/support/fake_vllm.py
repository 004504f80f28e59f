"""A stand-in for vLLM's engine-argument and engine classes (no engine starts), for unit
tests of what HAIF hands vLLM; and a vLLM model's config."""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any, ClassVar

import pytest

from haif.config import ModelConfig


def vllm_model(**fields: Any) -> ModelConfig:
    return ModelConfig(name="llama", runtime="vllm", path="/m", **fields)


@dataclasses.dataclass
class FakeEngineArgs:
    model: str
    tokenizer: str
    dtype: str
    max_model_len: int
    max_num_seqs: int | None = None
    seed: int = 0
    stream_interval: int = 1
    enforce_eager: bool = False
    structured_outputs_config: Any = None


@dataclasses.dataclass
class FakeStructuredOutputsConfig:
    backend: str = "auto"
    disable_any_whitespace: bool = False


class FakeAsyncLLM:
    started: ClassVar[list[FakeEngineArgs]] = []

    @classmethod
    def from_engine_args(cls, args: FakeEngineArgs) -> FakeAsyncLLM:
        cls.started.append(args)
        return cls()


def install_fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeAsyncLLM]:
    """vLLM's engine-argument and engine classes, nothing else: no engine starts."""
    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs = FakeEngineArgs  # type: ignore[attr-defined]
    vllm.__version__ = "0.0-fake"  # type: ignore[attr-defined]
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = FakeAsyncLLM  # type: ignore[attr-defined]
    config = types.ModuleType("vllm.config")
    config.StructuredOutputsConfig = FakeStructuredOutputsConfig  # type: ignore[attr-defined]
    for name, module in [("vllm", vllm), ("vllm.config", config), ("vllm.v1", types.ModuleType("vllm.v1")),
                         ("vllm.v1.engine", types.ModuleType("vllm.v1.engine")),
                         ("vllm.v1.engine.async_llm", async_llm)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeAsyncLLM, "started", [])
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return FakeAsyncLLM
