"""A vLLM model that serves LoRA adapters starts its engine with LoRA on and room for
max_adapters_per_worker of them; on CPU one slot more (vLLM's CPU kernels run the base's
rows through the last slot when every slot is filled)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from haif.exceptions import ModelLoadFailed
from haif.runtimes.vllm import engine_args, engine_kwargs
from tests.support.fake_vllm import FakeAsyncLLM, FakeEngineArgs, vllm_model

pytestmark = pytest.mark.unit

ADAPTERS = {"adapters": [{"name": "sql", "artifact": "sql:1"}], "max_adapters_per_worker": 3}


def test_lora_is_on_only_for_a_model_with_adapters() -> None:
    assert "enable_lora" not in engine_kwargs(vllm_model(), "/m", "cpu")
    on_cpu = engine_kwargs(vllm_model(**ADAPTERS), "/m", "cpu")
    assert (on_cpu["enable_lora"], on_cpu["max_loras"], on_cpu["max_cpu_loras"]) == (True, 4, 4)
    on_gpu = engine_kwargs(vllm_model(**ADAPTERS), "/m", "cuda")
    assert (on_gpu["max_loras"], on_gpu["max_cpu_loras"]) == (3, 3)
    dynamic = engine_kwargs(vllm_model(dynamic_adapters=True, max_adapters_per_worker=1), "/m", "cpu")
    assert dynamic["enable_lora"] and dynamic["max_loras"] == 2
    mine = engine_kwargs(vllm_model(**ADAPTERS, engine={"max_loras": 8, "max_lora_rank": 64}), "/m", "cpu")
    assert (mine["max_loras"], mine["max_lora_rank"]) == (8, 64), "engine: passed through as given"


@dataclasses.dataclass
class _LoraEngineArgs(FakeEngineArgs):
    enable_lora: bool = False
    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16


def test_on_cpu_every_lora_slot_filled_is_refused(fake_vllm: type[FakeAsyncLLM]) -> None:
    sys.modules["vllm"].AsyncEngineArgs = _LoraEngineArgs  # type: ignore[attr-defined]
    args = engine_args(vllm_model(**ADAPTERS, engine={"max_lora_rank": 8}), "/m", "cpu")
    assert (args.enable_lora, args.max_loras, args.max_cpu_loras, args.max_lora_rank) == (True, 4, 4, 8)
    with pytest.raises(ModelLoadFailed, match=r"engine.max_loras \(3\) must exceed max_adapters_per_worker \(3\)"):
        engine_args(vllm_model(**ADAPTERS, engine={"max_loras": 3}), "/m", "cpu")
    assert fake_vllm.started == []
