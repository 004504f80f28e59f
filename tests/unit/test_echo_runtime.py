"""The echo runtime and StopMatcher: exact echoes, stop strings, limits, embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from haif.config import ModelConfig
from haif.exceptions import PromptTooLong
from haif.runtimes.base import ChatMessage, RuntimeContext, SamplingParams, StopMatcher, StreamEvent
from haif.runtimes.echo import ECHO_EMBEDDING_DIM, EchoRuntime, tokenize
from tests.support.aio import run_sync

pytestmark = pytest.mark.unit


def runtime(max_prompt_tokens: int = 1024, **model: Any) -> EchoRuntime:
    ctx = RuntimeContext(
        model=ModelConfig(name="echo", runtime="echo", **model),
        model_dir=None,
        device="cpu",
        max_prompt_tokens=max_prompt_tokens,
    )
    rt = EchoRuntime(ctx)
    run_sync(rt.load())
    return rt


async def events(rt: EchoRuntime, prompt: str, **params: Any) -> list[StreamEvent]:
    async def collect() -> list[StreamEvent]:
        return [e async for e in rt.stream(prompt, SamplingParams(**params))]

    return await collect()


async def generate(rt: EchoRuntime, prompt: str, **params: Any):
    return await rt.generate(prompt, SamplingParams(**params))


# --- completions ----------------------------------------------------------------------


def test_tokenize_keeps_whitespace() -> None:
    assert tokenize("a bb  c\n") == ["a ", "bb  ", "c\n"]
    assert "".join(tokenize("  lead and trail  ")) == "  lead and trail  "


async def test_completion_is_the_prompt_when_it_fits() -> None:
    out = await generate(runtime(), "one two three", max_tokens=10)
    assert out.text == "one two three"
    assert out.finish_reason == "stop"
    assert out.prompt_tokens == 3
    assert out.completion_tokens == 3


async def test_completion_exactly_max_tokens_is_stop() -> None:
    out = await generate(runtime(), "one two three", max_tokens=3)
    assert out.text == "one two three"
    assert out.finish_reason == "stop"


async def test_completion_cut_at_max_tokens() -> None:
    out = await generate(runtime(), "one two three four", max_tokens=2)
    assert out.text == "one two "
    assert out.finish_reason == "length"
    assert (out.prompt_tokens, out.completion_tokens) == (4, 2)


async def test_stream_events_carry_usage_and_end_with_finish() -> None:
    evs = await events(runtime(), "a b c", max_tokens=8)
    assert "".join(e.text for e in evs) == "a b c"
    assert all(e.prompt_tokens == 3 for e in evs)
    assert [e.finish_reason for e in evs[:-1]] == [None] * (len(evs) - 1)
    assert evs[-1].finish_reason == "stop"
    assert evs[-1].completion_tokens == 3


async def test_chat_renders_messages_joined_by_newlines() -> None:
    rt = runtime()
    prompt = rt.render_chat([ChatMessage("system", "be brief"), ChatMessage("user", "hi there")])
    assert prompt == "be brief\nhi there"
    assert (await generate(rt, prompt, max_tokens=16)).text == prompt


# --- stop strings ---------------------------------------------------------------------


async def test_stop_string_cuts_output() -> None:
    out = await generate(runtime(), "alpha beta STOP gamma", max_tokens=16, stop=("STOP",))
    assert out.text == "alpha beta "
    assert out.finish_reason == "stop"
    assert out.completion_tokens == 3


async def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    # "beta gamma" spans two tokens; no event may carry any part of it.
    evs = await events(runtime(), "alpha beta gamma delta", max_tokens=16, stop=("beta gamma",))
    assert "".join(e.text for e in evs) == "alpha "
    assert evs[-1].finish_reason == "stop"
    streamed = "".join(e.text for e in evs)
    assert "beta" not in streamed


async def test_earliest_of_several_stops_wins() -> None:
    out = await generate(runtime(), "x y z w", max_tokens=16, stop=("z", "y z"))
    assert out.text == "x "


async def test_partial_stop_at_end_is_flushed() -> None:
    # "three fo" looks like the start of the stop string but the prompt ends first.
    out = await generate(runtime(), "one two three", max_tokens=16, stop=("three four",))
    assert out.text == "one two three"
    assert out.finish_reason == "stop"
    cut = await generate(runtime(), "one two three four", max_tokens=3, stop=("three four",))
    assert cut.text == "one two three "
    assert cut.finish_reason == "length"


def test_stop_matcher_holds_back_possible_prefix() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abcE") == ("ab", False)
    # Only len("END") - 1 characters are held back.
    assert m.feed("N") == ("c", False)
    assert m.feed("D tail") == ("", True)


def test_stop_matcher_pieces() -> None:
    m = StopMatcher(["\n\n", "###"])
    out: list[str] = []
    stopped = False
    for piece in ["Hello", " world", "\n", "#", "#", "x", "\n", "\nmore"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(out) == "Hello world\n##x"


def test_stop_matcher_without_stops_passes_through() -> None:
    m = StopMatcher(["", ""])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_stop_matcher_single_char_stop() -> None:
    m = StopMatcher([","])
    assert m.feed("ab") == ("ab", False)
    assert m.feed("c,d") == ("c", True)


def test_stop_matcher_flush() -> None:
    m = StopMatcher(["xyz"])
    assert m.feed("abxy") == ("ab", False)
    assert m.flush() == "xy"
    assert m.flush() == ""


# --- limits ---------------------------------------------------------------------------


async def test_prompt_over_max_prompt_tokens() -> None:
    rt = runtime(max_prompt_tokens=3)
    assert (await generate(rt, "a b c", max_tokens=1)).text == "a "
    with pytest.raises(PromptTooLong, match="4 tokens; the limit is 3") as info:
        await generate(rt, "a b c d", max_tokens=1)
    assert info.value.status_code == 422
    assert info.value.code == "context_length_exceeded"


async def test_prompt_plus_max_tokens_over_context() -> None:
    rt = runtime(max_model_len=16)
    prompt = " ".join(["w"] * 10)
    assert (await generate(rt, prompt, max_tokens=6)).completion_tokens == 6
    with pytest.raises(PromptTooLong, match="context of 16 tokens"):
        await generate(rt, prompt, max_tokens=7)


# --- embeddings -----------------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    rt = runtime()
    texts = ["hello world", "another text", ""]
    first = await rt.embed(texts)
    second = await runtime().embed(texts)
    assert first.vectors.shape == (3, ECHO_EMBEDDING_DIM)
    assert first.vectors.dtype == np.float32
    np.testing.assert_array_equal(first.vectors, second.vectors)
    np.testing.assert_allclose(np.linalg.norm(first.vectors, axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(first.vectors[0], first.vectors[1])
    assert first.prompt_tokens == 4
