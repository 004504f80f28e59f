"""`n` > 1 through the whole platform with the official client, on every generating runtime:
each choice a generation of its own, numbered as OpenAI numbers them, the prompt counted
once in usage, streamed choices interleaved until the last one ends."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.support.deployment import Deployment

MODELS = ["echo", "tiny-llama", "tiny-llama-vllm"]
SAMPLING_MODELS = ["tiny-llama", "tiny-llama-vllm"]  # echo does not sample


@pytest.fixture(scope="module")
def client(haif: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{haif.url}/v1", api_key=haif.api_key, max_retries=0)


def by_choice(chunks: list[Any], text: Any) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's streamed text and finish reason."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (text(choice) or "")
            if choice.finish_reason is not None:
                assert choice.index not in finishes, "a choice finished twice"
                finishes[choice.index] = choice.finish_reason
    return texts, finishes


@pytest.mark.parametrize("model", MODELS)
def test_greedy_choices_repeat_the_single_answer_plain_and_streamed(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "The farmer walked to the market", "max_tokens": 8,
                              "temperature": 0}
    one = client.completions.create(**kwargs)
    three = client.completions.create(**kwargs, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens

    chunks = list(client.completions.create(**kwargs, n=3, stream=True, stream_options={"include_usage": True}))
    texts, finishes = by_choice(chunks, lambda c: c.text)
    assert texts == {i: one.choices[0].text for i in range(3)}
    assert finishes == {i: one.choices[0].finish_reason for i in range(3)}
    assert chunks[-1].choices == [] and chunks[-1].usage == three.usage


def test_several_prompts_times_n_are_numbered_prompt_by_prompt(client: openai.OpenAI) -> None:
    prompts = ["one two three", "four five"]
    answer = client.completions.create(model="echo", prompt=prompts, max_tokens=8, temperature=0, n=2)
    singles = [client.completions.create(model="echo", prompt=p, max_tokens=8, temperature=0) for p in prompts]
    assert [c.text for c in answer.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


@pytest.mark.parametrize("model", SAMPLING_MODELS)
def test_seeded_chat_choices_differ_from_each_other_and_repeat(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": "Tell me about the lighthouse."}],
        "max_tokens": 12, "temperature": 1.0, "seed": 1234, "n": 2,
    }
    first = client.chat.completions.create(**kwargs)
    contents = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert contents[0] != contents[1]  # seed + i: the choices are two samples, not one twice
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == contents

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finishes = by_choice(chunks, lambda c: c.delta.content)
    assert texts == dict(enumerate(contents))
    assert set(finishes) == {0, 1}
    assert chunks[-1].usage == first.usage


def test_n_beyond_the_limit_is_refused_with_the_limit_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="'n' is 9; the limit is 8"):
        client.completions.create(model="echo", prompt="hi", n=9)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="echo", prompt="hi", n=0)
