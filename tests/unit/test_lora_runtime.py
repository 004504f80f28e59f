"""LoRA adapters on the torch runtime: real PEFT adapters of tiny-llama (non-zero B).

Greedy output through an adapter differs from the base's and repeats; PEFT itself, run
in this process on the same files, picks the same greedy tokens; one batch mixing the
base and two adapters gives every request the answer it gets alone; adapters that do not
fit the base are refused, named, with nothing loaded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from haif.config import ModelConfig
from haif.exceptions import AdapterRejected
from haif.runtimes.base import RuntimeContext, SamplingParams
from haif.runtimes.lora import read_adapter
from haif.runtimes.torch import TorchRuntime
from tests.support.lora_cases import build_models

pytestmark = pytest.mark.unit

PROMPTS = ["The teacher", "Hello", "Why is the river so quiet?"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build_models(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # one loop: the runtime's batcher lives on it
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def runtime(models: tuple[Path, dict[str, Path]], loop: asyncio.AbstractEventLoop) -> Iterator[TorchRuntime]:
    base, adapters = models
    config = ModelConfig(name="tiny-llama", runtime="torch", path=str(base),
                         torch={"max_batch_size": 16, "max_wait_ms": 50})
    rt = TorchRuntime(RuntimeContext(model=config, model_dir=str(base), device="cpu", max_prompt_tokens=512))
    loop.run_until_complete(rt.load())
    rt.base_alone = {p: loop.run_until_complete(rt.generate(p, GREEDY)).text for p in PROMPTS}  # type: ignore[attr-defined]
    for name in ("lora-a", "lora-b"):
        loop.run_until_complete(rt.load_adapter(name, str(adapters[name])))
    yield rt
    loop.run_until_complete(rt.unload())


def _run(loop: asyncio.AbstractEventLoop, coro):  # noqa: ANN001, ANN202
    return loop.run_until_complete(coro)


def test_an_adapter_changes_greedy_output_and_repeats_it(runtime: TorchRuntime, loop: asyncio.AbstractEventLoop) -> None:
    for prompt in PROMPTS:
        base = _run(loop, runtime.generate(prompt, GREEDY)).text
        first = _run(loop, runtime.generate(prompt, GREEDY, adapter="lora-a")).text
        again = _run(loop, runtime.generate(prompt, GREEDY, adapter="lora-a")).text
        other = _run(loop, runtime.generate(prompt, GREEDY, adapter="lora-b")).text
        assert first == again, "greedy output through an adapter is the same on every call"
        assert first != base and other != base and first != other, prompt


def test_the_base_is_unchanged_once_adapters_are_loaded(runtime: TorchRuntime, loop: asyncio.AbstractEventLoop) -> None:
    # One copy of the weights: the adapters ride beside them, the base's rows see none of it.
    for prompt in PROMPTS:
        assert _run(loop, runtime.generate(prompt, GREEDY)).text == runtime.base_alone[prompt]  # type: ignore[attr-defined]


def test_peft_in_process_picks_the_same_greedy_tokens(
    runtime: TorchRuntime, models: tuple[Path, dict[str, Path]], loop: asyncio.AbstractEventLoop
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapters = models
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for name in ("lora-a", "lora-b"):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, str(adapters[name])).eval()
        for prompt in PROMPTS:
            ids = runtime.encode(prompt)
            with torch.inference_mode():
                out = peft_model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                    max_new_tokens=GREEDY.max_tokens, do_sample=False,
                )
            expected = tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)
            haif = _run(loop, runtime.generate(prompt, GREEDY, adapter=name))
            assert haif.text == expected, (name, prompt)
            assert haif.completion_tokens == len(out[0]) - len(ids)


def test_a_batch_mixing_the_base_and_two_adapters_gives_each_its_own_answer(
    runtime: TorchRuntime, loop: asyncio.AbstractEventLoop
) -> None:
    mix = [(p, a) for p in PROMPTS for a in (None, "lora-a", "lora-b")]
    alone = {(p, a): _run(loop, runtime.generate(p, GREEDY, adapter=a)).text for p, a in mix}
    before = runtime.stats()["batches"]
    async def batch() -> list:
        return await asyncio.gather(*(runtime.generate(p, GREEDY, adapter=a) for p, a in mix))

    together = _run(loop, batch())
    assert [o.text for o in together] == [alone[k] for k in mix]
    # One batch (not one per adapter): base and adapters shared the forward passes.
    assert runtime.stats()["batches"] - before == 1
    assert runtime.stats()["max_batch_seen"] >= len(mix)


def test_a_stream_through_an_adapter_is_its_generation(runtime: TorchRuntime, loop: asyncio.AbstractEventLoop) -> None:
    async def collect() -> str:
        return "".join([e.text async for e in runtime.stream("Hello", GREEDY, adapter="lora-b")])

    assert _run(loop, collect()) == _run(loop, runtime.generate("Hello", GREEDY, adapter="lora-b")).text


def test_an_adapter_not_loaded_is_refused(runtime: TorchRuntime, loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(AdapterRejected, match="lora-z is not loaded"):
        _run(loop, runtime.generate("Hello", GREEDY, adapter="lora-z"))


def test_unload_and_reload(
    runtime: TorchRuntime, models: tuple[Path, dict[str, Path]], loop: asyncio.AbstractEventLoop
) -> None:
    _, adapters = models
    through_c = None
    _run(loop, runtime.load_adapter("lora-c", str(adapters["lora-c"])))
    try:
        through_c = _run(loop, runtime.generate("Hello", GREEDY, adapter="lora-c")).text
        assert sorted(runtime.adapters()) == ["lora-a", "lora-b", "lora-c"]
    finally:
        _run(loop, runtime.unload_adapter("lora-c"))
    assert sorted(runtime.adapters()) == ["lora-a", "lora-b"]
    with pytest.raises(AdapterRejected):
        _run(loop, runtime.generate("Hello", GREEDY, adapter="lora-c"))
    # The others keep their slots' answers after the stacks were rebuilt without it.
    assert _run(loop, runtime.generate("Hello", GREEDY)).text == runtime.base_alone["Hello"]  # type: ignore[attr-defined]
    _run(loop, runtime.load_adapter("lora-c", str(adapters["lora-c"])))
    assert _run(loop, runtime.generate("Hello", GREEDY, adapter="lora-c")).text == through_c
    _run(loop, runtime.unload_adapter("lora-c"))


def _edited(src: Path, dst: Path, **config: object) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"r": 0}, "positive"),
    ],
)
def test_what_the_runtime_does_not_apply_is_refused_by_name(
    models: tuple[Path, dict[str, Path]], tmp_path: Path, change: dict, reason: str
) -> None:
    with pytest.raises(AdapterRejected, match=reason):
        read_adapter(_edited(models[1]["lora-a"], tmp_path / "edited", **change), "edited")


def test_an_adapter_for_other_shapes_is_refused_and_nothing_is_loaded(
    runtime: TorchRuntime, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    from haif.devmodels.tiny_llama import build_tiny_lora

    base = tmp_path / "wider"
    base.mkdir()
    config = json.loads((Path(runtime.ctx.model_dir or "") / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "head_dim": 32}))
    wrong = build_tiny_lora(tmp_path / "wrong", base, seed=5)
    with pytest.raises(AdapterRejected, match="trained on another base"):
        _run(loop, runtime.load_adapter("wrong", str(wrong)))
    assert "wrong" not in runtime.adapters()
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(AdapterRejected, match="not a PEFT LoRA directory"):
        _run(loop, runtime.load_adapter("empty", str(missing)))
    assert _run(loop, runtime.generate("Hello", GREEDY)).text == runtime.base_alone["Hello"]  # type: ignore[attr-defined]
