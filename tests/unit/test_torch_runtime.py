"""The torch runtime on tiny-llama: streaming, limits, sampling, dynamic batching, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from haif.config import ModelConfig
from haif.devmodels import build_tiny_llama
from haif.exceptions import (
    InternalError,
    ModelLoadFailed,
    ModelNotReady,
    PromptTooLong,
    WorkerUnavailable,
)
from haif.runtimes.base import ChatMessage, RuntimeContext, SamplingParams, StreamEvent
from haif.runtimes.torch import TorchRuntime, _IncrementalDecoder
from tests.support.aio import run_sync
from tests.support.waiting import wait_for

pytestmark = pytest.mark.unit

PROMPTS = [
    "The teacher",
    "A young farmer carried a basket of plums to the market",
    "Why is the river so quiet?",
    "On Monday, 3 March, we ate pancakes with a librarian from Norway.",
    "Hello",
    "The old lighthouse still shines every night, although no ship has needed it for years. The",
    "Question: what does a pilot do? Answer:",
    "It was a bright town, and the",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")


def make_runtime(model_dir: Path, *, max_prompt_tokens: int = 1024, **model: Any) -> TorchRuntime:
    config = ModelConfig(name="tiny-llama", runtime="torch", path=str(model_dir), **model)
    ctx = RuntimeContext(model=config, model_dir=str(model_dir), device="cpu",
                         max_prompt_tokens=max_prompt_tokens)
    runtime = TorchRuntime(ctx)
    run_sync(runtime.load())
    return runtime


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Iterator[TorchRuntime]:
    rt = make_runtime(model_dir, torch={"max_batch_size": 16, "max_wait_ms": 20})
    yield rt
    run_sync(rt.unload())


@pytest.fixture
def fresh(model_dir: Path) -> Iterator[Callable[..., TorchRuntime]]:
    """A factory of runtimes with their own config and counters, unloaded afterwards."""
    made: list[TorchRuntime] = []

    def factory(**model: Any) -> TorchRuntime:
        made.append(make_runtime(model_dir, **model))
        return made[-1]

    yield factory
    for rt in made:
        run_sync(rt.unload())


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def collect(rt: TorchRuntime, prompt: str, params: SamplingParams) -> list[StreamEvent]:
    async with contextlib.aclosing(rt.stream(prompt, params)) as stream:
        return [event async for event in stream]


def reference_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding, without any runtime in between."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


async def test_streams_tokens_until_max_tokens(runtime: TorchRuntime, model_dir: Path) -> None:
    events = await collect(runtime, PROMPTS[1], greedy(20))
    assert len(events) > 1
    assert all(e.finish_reason is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason == "length"
    assert last.completion_tokens == 20
    assert last.prompt_tokens == len(runtime.encode(PROMPTS[1]))
    counts = [e.completion_tokens for e in events]
    assert counts == sorted(counts)
    expected = runtime._tokenizer.decode(reference_greedy(model_dir, PROMPTS[1], 20),
                                         skip_special_tokens=True)
    assert "".join(e.text for e in events) == expected


async def test_stop_string_ends_the_stream(runtime: TorchRuntime) -> None:
    full = (await runtime.generate(PROMPTS[0], greedy(24))).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = await runtime.generate(PROMPTS[0], greedy(24, stop=(stop,)))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert out.completion_tokens < 24


async def test_eos_token_ends_the_stream(fresh: Callable[..., TorchRuntime], model_dir: Path) -> None:
    rt = fresh()
    tokens = reference_greedy(model_dir, PROMPTS[2], 12)
    rt._eos_ids = frozenset({tokens[5]})  # pretend the 6th greedy token is the model's EOS
    out = await rt.generate(PROMPTS[2], greedy(12))
    first = tokens.index(tokens[5])
    assert out.finish_reason == "stop"
    assert out.completion_tokens == first + 1
    assert out.text == rt._tokenizer.decode(tokens[:first], skip_special_tokens=True)


async def test_seeded_sampling_is_reproducible(runtime: TorchRuntime) -> None:
    async def sample(seed: int) -> str:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return (await runtime.generate(PROMPTS[4], params)).text

    assert await sample(7) == await sample(7)
    assert len({await sample(7), await sample(8), await sample(9)}) > 1


async def test_seeded_sampling_is_the_same_inside_a_batch(runtime: TorchRuntime) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=42)
    alone = (await runtime.generate(PROMPTS[3], params)).text

    async def crowd() -> list[str]:
        others = [runtime.generate(p, SamplingParams(max_tokens=16)) for p in PROMPTS[:5]]
        outs = await asyncio.gather(runtime.generate(PROMPTS[3], params), *others)
        return [o.text for o in outs]

    assert (await crowd())[0] == alone


async def test_greedy_alone_equals_greedy_in_a_batch(fresh: Callable[..., TorchRuntime]) -> None:
    rt = fresh(torch={"max_batch_size": 16, "max_wait_ms": 50})
    params = greedy(16)

    async def alone() -> list[str]:
        return [(await rt.generate(p, params)).text for p in PROMPTS]

    async def together() -> list[str]:
        return [o.text for o in await asyncio.gather(*(rt.generate(p, params) for p in PROMPTS))]

    singles = await alone()
    assert rt.stats()["max_batch_seen"] == 1
    batched = await together()
    assert rt.stats()["max_batch_seen"] == len(PROMPTS)
    assert batched == singles


async def test_concurrent_requests_form_batches(fresh: Callable[..., TorchRuntime]) -> None:
    rt = fresh(torch={"max_batch_size": 16, "max_wait_ms": 20})

    async def burst() -> list[Any]:
        return await asyncio.gather(
            *(rt.generate(PROMPTS[i % len(PROMPTS)], greedy(8)) for i in range(16))
        )

    outs = await burst()
    assert all(o.completion_tokens == 8 and o.finish_reason == "length" for o in outs)
    stats = rt.stats()
    assert stats["max_batch_seen"] > 1
    assert stats["batches"] < 16
    assert stats["batched_requests"] == 16


async def test_batches_never_exceed_max_batch_size(fresh: Callable[..., TorchRuntime]) -> None:
    rt = fresh(torch={"max_batch_size": 3, "max_wait_ms": 20})

    async def burst() -> None:
        await asyncio.gather(*(rt.generate(p, greedy(4)) for p in PROMPTS))

    await burst()
    assert rt.stats()["max_batch_seen"] == 3
    assert rt.stats()["batches"] >= 3


async def test_cancelled_stream_stops_generating(
    fresh: Callable[..., TorchRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = fresh(torch={"max_batch_size": 4, "max_wait_ms": 20})
    real_forward = rt._forward
    steps: list[int] = []

    def counting_forward(ids: Any, *args: Any, **kwargs: Any) -> Any:
        steps.append(ids.shape[0])  # rows computed in this step
        return real_forward(ids, *args, **kwargs)

    monkeypatch.setattr(rt, "_forward", counting_forward)

    async def scenario() -> tuple[int, str]:
        long_run = asyncio.create_task(rt.generate(PROMPTS[0], greedy(40)))
        stream = rt.stream(PROMPTS[1], greedy(1000))
        seen = 0
        async for event in stream:
            seen = event.completion_tokens
            if seen >= 3:
                break
        await stream.aclose()
        other = await long_run  # the batch goes on for the rows still wanted
        return seen, other.finish_reason

    seen, other_reason = await scenario()
    assert seen >= 3
    assert other_reason == "length"
    wait_for(lambda: rt.stats()["active"] == 0)
    stats = rt.stats()
    assert stats["cancelled"] == 1
    assert stats["batches"] == 1
    assert steps[0] == 2  # both rows started together
    assert len(steps) == 40  # prefill + 39 decode steps of the 40-token request, not 1000
    assert steps[-1] == 1  # the cancelled row left the batch


async def test_cancelling_the_consumer_task_frees_the_row(fresh: Callable[..., TorchRuntime]) -> None:
    rt = fresh()

    async def scenario() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in rt.stream(PROMPTS[2], greedy(1000)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    await scenario()
    wait_for(lambda: rt.stats()["active"] == 0)
    assert rt.stats()["cancelled"] == 1


async def test_prompt_too_long_is_raised_before_queueing(model_dir: Path) -> None:
    rt = make_runtime(model_dir, max_prompt_tokens=8, max_model_len=64)
    try:
        with pytest.raises(PromptTooLong):
            await collect(rt, PROMPTS[5], greedy(4))
        with pytest.raises(PromptTooLong):  # prompt + max_tokens over max_model_len
            await collect(rt, PROMPTS[0], greedy(63))
        assert rt.stats()["batches"] == 0
        assert rt.stats()["cancelled"] == 0
    finally:
        await rt.unload()


async def test_a_failing_batch_fails_its_requests_and_the_loop_survives(
    fresh: Callable[..., TorchRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = fresh()
    real_forward = rt._forward
    calls = {"n": 0}

    def flaky_forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(rt, "_forward", flaky_forward)

    async def scenario() -> tuple[list[Any], Any]:
        first = await asyncio.gather(*(rt.generate(p, greedy(8)) for p in PROMPTS[:3]),
                                     return_exceptions=True)
        second = await rt.generate(PROMPTS[0], greedy(8))
        return first, second

    first, second = await scenario()
    assert all(isinstance(e, InternalError) and "device fell over" in str(e) for e in first)
    assert second.completion_tokens == 8
    assert rt.stats()["failed_batches"] == 1


async def test_render_chat_uses_the_template(runtime: TorchRuntime) -> None:
    prompt = runtime.render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = runtime.encode(prompt)
    assert ids.count(runtime._tokenizer.bos_token_id) == 1  # template BOS, not doubled
    out = await runtime.generate(prompt, greedy(4))
    assert out.prompt_tokens == len(ids)


def test_incremental_decoding_never_splits_characters(runtime: TorchRuntime) -> None:
    tokenizer = runtime._tokenizer
    text = "Grüße aus Köln 🙂 — 日本語 and plain words."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoder = _IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


async def test_unloaded_runtime_is_not_ready(fresh: Callable[..., TorchRuntime]) -> None:
    rt = fresh()
    await rt.unload()
    with pytest.raises(ModelNotReady):
        await collect(rt, "Hello", greedy(2))


async def test_unload_fails_running_and_queued_requests(fresh: Callable[..., TorchRuntime]) -> None:
    rt = fresh(torch={"max_batch_size": 1, "max_wait_ms": 0})

    async def scenario() -> list[Any]:
        running = asyncio.create_task(collect(rt, PROMPTS[0], greedy(1000)))
        queued = asyncio.create_task(collect(rt, PROMPTS[1], greedy(1000)))
        while rt.stats()["active"] == 0:
            await asyncio.sleep(0.005)
        await rt.unload()
        return await asyncio.gather(running, queued, return_exceptions=True)

    results = await scenario()
    assert all(isinstance(r, WorkerUnavailable) for r in results)


async def test_load_failure_is_a_clear_error(tmp_path: Path) -> None:
    config = ModelConfig(name="missing", runtime="torch", path=str(tmp_path / "nothing"))
    rt = TorchRuntime(RuntimeContext(model=config, model_dir=str(tmp_path / "nothing"),
                                     device="cpu", max_prompt_tokens=64))
    with pytest.raises(ModelLoadFailed, match="missing"):
        await rt.load()
    with pytest.raises(ModelNotReady):
        rt.encode("Hello")
