"""`n` > 1: choices per prompt, each a generation of its own, from the request's limits to
its usage, its answer's shape and its merged stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from haif.config import LimitsConfig
from haif.envelope import RequestContext, build_work_item
from haif.exceptions import PromptTooLong, UnprocessableRequest
from haif.gateway.quota import reservation_tokens
from haif.gateway.serving import StreamFormatter, chat_response, completion_response
from haif.protocol import ChatCompletionRequest, CompletionRequest
from haif.runtimes.base import GenerationOutput, SamplingParams, StreamEvent, StreamTally, usage_of
from haif.runtimes.streams import merge_choices

pytestmark = pytest.mark.unit


def ctx() -> RequestContext:
    return RequestContext.new(timeout_s=30, api_key="k")


# --- limits and quota ------------------------------------------------------------------


def test_n_beyond_the_operators_limit_is_refused_with_the_limit_named() -> None:
    limits = LimitsConfig(max_choices=4)
    body = CompletionRequest(model="m", prompt="hi", n=5)
    with pytest.raises(UnprocessableRequest, match="'n' is 5; the limit is 4"):
        build_work_item("completion", body, ctx(), limits)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=4)
    assert build_work_item("chat", chat, ctx(), limits).n_choices == 4


def test_the_reservation_covers_every_choice_of_every_prompt() -> None:
    limits = LimitsConfig()
    one = build_work_item("completion", CompletionRequest(model="m", prompt=["ab", "cd"], max_tokens=10), ctx(), limits)
    three = build_work_item(
        "completion", CompletionRequest(model="m", prompt=["ab", "cd"], max_tokens=10, n=3), ctx(), limits
    )
    prompt = reservation_tokens(one, 4.0) - 2 * 10
    assert reservation_tokens(three, 4.0) == prompt + 2 * 3 * 10


# --- sampling ------------------------------------------------------------------------------


def test_a_seeded_request_samples_choice_i_with_seed_plus_i_in_the_64_bit_range() -> None:
    params = SamplingParams(max_tokens=4, seed=7)
    assert [params.for_choice(i).seed for i in range(3)] == [7, 8, 9]
    assert params.for_choice(0) is params
    top = SamplingParams(max_tokens=4, seed=2**63 - 1)
    assert top.for_choice(1).seed == -(2**63)  # wraps, as the protocol's bounds allow
    unseeded = SamplingParams(max_tokens=4)
    assert unseeded.for_choice(5).seed is None


# --- usage and the answer's shape -----------------------------------------------------------


def out(text: str, prompt: int, completion: int) -> GenerationOutput:
    return GenerationOutput(text, prompt, completion, "length")


def test_usage_counts_each_prompt_once_and_every_choice() -> None:
    outputs = [out("a", 3, 2), out("b", 3, 4), out("c", 5, 1), out("d", 5, 1)]  # 2 prompts x 2 choices
    assert usage_of(outputs, 2) == (3 + 5, 2 + 4 + 1 + 1)
    assert usage_of(outputs, 1) == (3 + 3 + 5 + 5, 8)


def test_completion_choices_are_numbered_prompt_by_prompt() -> None:
    outputs = [out("a", 3, 2), out("b", 3, 4), out("c", 5, 1), out("d", 5, 1)]
    response = completion_response("m", outputs, "cmpl-1", n_choices=2)
    assert [(c.index, c.text) for c in response.choices] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (8, 8)


def test_a_chat_answer_has_one_message_per_choice() -> None:
    response = chat_response("m", [out("a", 3, 2), out("b", 3, 4)], "chatcmpl-1", n_choices=2)
    assert [(c.index, c.message.content) for c in response.choices] == [(0, "a"), (1, "b")]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 6)
    with pytest.raises(ValueError, match="2 choices; got 1"):
        chat_response("m", [out("a", 3, 2)], n_choices=2)


def test_the_stream_formatter_numbers_choices_and_ends_with_the_last() -> None:
    fmt = StreamFormatter("chat", "m", include_usage=True, response_id="chatcmpl-1", n_choices=2)
    first = fmt.first()
    assert [(c.index, c.delta.role) for c in first.choices] == [(0, "assistant"), (1, "assistant")]
    a = fmt.event(StreamEvent("a", 1, 3, index=1))
    assert [(c.index, c.delta.content, c.finish_reason) for c in a.choices] == [(1, "a", None)]
    fmt.event(StreamEvent("x", 2, 3, "stop", index=0))
    assert not fmt.finished
    fmt.event(StreamEvent("", 1, 3, "length", index=1))
    assert fmt.finished
    usage = fmt.usage_chunk()
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (3, 2 + 1)


def test_a_tally_is_finished_only_when_every_choice_is() -> None:
    tally = StreamTally(3)
    for index in (2, 0):
        tally.add(StreamEvent("t", 4, 9, "stop", index=index))
    assert not tally.finished and tally.completion_tokens == 8
    tally.add(StreamEvent("t", 1, 9, "length", index=1))
    assert tally.finished and tally.prompt_tokens == 9 and tally.completion_tokens == 9


# --- merging the choices' streams ------------------------------------------------------------


class Source:
    """One choice's stream: ``texts`` with a pause before each; records that it was closed."""

    def __init__(self, texts: list[str], pause_s: float, error: Exception | None = None) -> None:
        self.texts, self.pause_s, self.error = texts, pause_s, error
        self.closed = False

    async def run(self) -> AsyncIterator[StreamEvent]:
        try:
            for i, text in enumerate(self.texts):
                await asyncio.sleep(self.pause_s)
                last = i == len(self.texts) - 1
                yield StreamEvent(text, i + 1, 2, "stop" if last and self.error is None else None)
            if self.error is not None:
                raise self.error
            await asyncio.sleep(0)
        finally:
            self.closed = True


async def test_merged_choices_come_as_they_are_made_each_with_its_index() -> None:
    async def run() -> list[tuple[int, str]]:
        sources = [Source(["a", "b", "c"], 0.03), Source(["x", "y"], 0.01)]
        events = [e async for e in merge_choices([s.run() for s in sources])]
        assert all(s.closed for s in sources)
        return [(e.index, e.text) for e in events]

    events = await run()
    assert [t for i, t in events if i == 0] == ["a", "b", "c"]
    assert [t for i, t in events if i == 1] == ["x", "y"]
    assert events[0] == (1, "x")  # the faster choice is not held behind the slower one


async def test_a_failing_choice_ends_the_merged_stream_and_closes_the_others() -> None:
    async def run() -> tuple[list[str], list[Source]]:
        sources = [Source(["a", "b", "c", "d"], 0.05), Source(["x"], 0.01, PromptTooLong("too long"))]
        seen: list[str] = []
        with pytest.raises(PromptTooLong):
            async for event in merge_choices([s.run() for s in sources]):
                seen.append(event.text)
        return seen, sources

    seen, sources = await run()
    assert seen == ["x"]
    assert all(s.closed for s in sources)  # choice 0 stopped mid-way: its runtime slot freed


async def test_closing_the_merged_stream_closes_every_choice() -> None:
    async def run() -> list[Source]:
        sources = [Source(["a"] * 50, 0.01), Source(["x"] * 50, 0.01)]
        merged = merge_choices([s.run() for s in sources])
        await anext(merged)
        await merged.aclose()
        return sources

    assert all(s.closed for s in await run())
