"""Logprobs, echo and token-id prompts on the torch and echo runtimes: the tokens of every
choice join to its text (stop strings and multi-byte characters included), alternatives are
as many as asked, an echoed prompt comes first; token ids outside the vocabulary are a 400."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from haif.config import ModelConfig
from haif.exceptions import InvalidRequest, UnsupportedParameter
from haif.runtimes.base import Guide, LogprobsAligner, RuntimeContext, SamplingParams, TokenLogprob
from haif.runtimes.echo import EchoRuntime
from haif.runtimes.torch import TorchRuntime
from tests.support import tiny
from tests.support.aio import run_sync

pytestmark = pytest.mark.unit

PROMPT = "The old lighthouse still shines"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchRuntime]:
    rt = tiny.runtime(tiny.model_dir(tmp_path_factory), torch={"max_batch_size": 16, "max_wait_ms": 20})
    yield rt
    run_sync(rt.unload())


def joined(entries: tuple[TokenLogprob, ...]) -> str:
    return "".join(e.token for e in entries)


@pytest.mark.parametrize("seed", range(6))
async def test_tokens_join_to_the_text_with_k_alternatives(runtime: TorchRuntime, seed: int) -> None:
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=seed, logprobs=3)
    events = await tiny.events(runtime, PROMPT, params)
    text = "".join(e.text for e in events)
    for event in events:  # event by event too: what a stream's chunks carry
        assert joined(event.logprobs) == event.text or event.finish_reason is not None
    entries = tuple(x for e in events for x in e.logprobs)
    assert joined(entries) == text
    assert len(entries) == events[-1].completion_tokens
    for e in entries:
        assert e.logprob is not None and e.logprob <= 0.0
        assert len(e.top) == 3
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert e.logprob <= e.top[0].logprob + 1e-6
    same = await runtime.generate(PROMPT, params)
    assert same.text == text and joined(same.logprobs) == text  # and the whole answer


async def test_logprobs_do_not_change_the_answer(runtime: TorchRuntime) -> None:
    plain = await runtime.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0.9, seed=5))
    asked = await runtime.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0.9, seed=5, logprobs=5))
    assert asked.text == plain.text and asked.completion_tokens == plain.completion_tokens
    assert plain.logprobs == ()


async def test_a_stop_string_cuts_the_tokens_with_the_text(runtime: TorchRuntime) -> None:
    free = await runtime.generate(PROMPT, tiny.greedy(30, logprobs=1))
    stop = free.text[7:10]  # inside the answer, maybe across tokens
    cut = await runtime.generate(PROMPT, tiny.greedy(30, logprobs=1, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    assert joined(cut.logprobs) == cut.text


async def test_echo_returns_the_prompt_and_its_logprobs_first(runtime: TorchRuntime) -> None:
    events = await tiny.events(runtime, PROMPT, tiny.greedy(5, echo=True, logprobs=2))
    first = events[0]
    assert first.text == PROMPT and first.completion_tokens == 0
    prompt_ids = runtime.encode(PROMPT)
    assert len(first.logprobs) == len(prompt_ids)
    assert first.logprobs[0].logprob is None  # nothing before the first token
    assert all(e.logprob is not None and math.isfinite(e.logprob) and len(e.top) == 2 for e in first.logprobs[1:])
    assert joined(first.logprobs) == PROMPT
    out = await runtime.generate(PROMPT, tiny.greedy(5, echo=True))
    plain = await runtime.generate(PROMPT, tiny.greedy(5))
    assert out.text == PROMPT + plain.text and out.completion_tokens == 5 and out.logprobs == ()


async def test_a_prompt_of_token_ids_is_the_same_prompt(runtime: TorchRuntime) -> None:
    ids = runtime.encode(PROMPT)
    by_text = await runtime.generate(PROMPT, tiny.greedy(12))
    by_ids = await runtime.generate(ids, tiny.greedy(12, echo=True))
    assert by_ids.text == PROMPT + by_text.text
    assert by_ids.prompt_tokens == len(ids)


@pytest.mark.parametrize("ids", [[1, 99_999], [-1, 5]])
async def test_token_ids_outside_the_vocabulary_are_a_400(runtime: TorchRuntime, ids: list[int]) -> None:
    with pytest.raises(InvalidRequest, match=f"prompt: token id {ids[0] if ids[0] < 0 else ids[1]} is not in the vocabulary"):
        await runtime.generate(ids, tiny.greedy(4))


def test_the_aligner_keeps_tokens_in_step_with_released_text() -> None:
    aligner = LogprobsAligner()
    for token in ("ab", "", "cd", "ef"):
        aligner.add(TokenLogprob(token, -1.0, token.encode()))
    assert [e.token for e in aligner.release(1)] == []  # "a": half a token, it waits
    assert [e.token for e in aligner.release(3)] == ["ab", "", "cd"]  # "bcd"
    assert [e.token for e in aligner.release(1, final=True)] == ["e"]  # a stop string cut it


# --- the echo runtime: what it honours, what it refuses by name ----------------------------


def echo_runtime() -> EchoRuntime:
    model = ModelConfig(name="echo", runtime="echo", device="cpu")
    return EchoRuntime(RuntimeContext(model=model, model_dir=None, device="cpu", max_prompt_tokens=100))


async def test_echo_gives_certain_logprobs_and_echoes() -> None:
    rt = echo_runtime()
    out = await rt.generate("one two three", SamplingParams(max_tokens=2, logprobs=1, echo=True))
    assert out.text == "one two three" + "one two "
    assert [e.token for e in out.logprobs] == ["one ", "two ", "three", "one ", "two "]
    assert out.logprobs[0].logprob is None and {e.logprob for e in out.logprobs[1:]} == {0.0}
    assert out.logprobs[3].top[0].token == "one "
    stopped = await rt.generate("one two three", SamplingParams(max_tokens=9, logprobs=0, stop=("wo",)))
    assert stopped.text == "one t" and joined(stopped.logprobs) == "one t"


@pytest.mark.parametrize(
    ("params", "prompt", "named"),
    [
        (SamplingParams(max_tokens=4, logit_bias=((1, 5.0),)), "x", "logit_bias"),
        (SamplingParams(max_tokens=4, presence_penalty=1.0, repetition_penalty=1.1), "x",
         "presence_penalty, repetition_penalty"),
        (SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(3,)), "x", "min_tokens, stop_token_ids"),
        (SamplingParams(max_tokens=4, logprobs=3), "x", "top_logprobs above 1"),
        (SamplingParams(max_tokens=4, guide=Guide("json_object")), "x", "response_format"),
        (SamplingParams(max_tokens=4, guide=Guide("json_schema", "{}", param="tool_choice")), "x", "tool_choice"),
        (SamplingParams(max_tokens=4), [1, 2], "prompt (token ids)"),
    ],
)
def test_echo_refuses_what_it_cannot_honour_by_name(params: SamplingParams, prompt: object, named: str) -> None:
    rt = echo_runtime()
    with pytest.raises(UnsupportedParameter) as info:
        rt.check_request(params, [prompt])  # type: ignore[list-item]
    assert info.value.message == f"model 'echo' (runtime echo) does not support: {named}"
    assert info.value.status_code == 400
    rt.check_request(SamplingParams(max_tokens=4, top_k=3, min_p=0.1, ignore_eos=True, logprobs=1, echo=True), ["x"])


async def test_echo_refuses_token_id_embeddings() -> None:
    with pytest.raises(UnsupportedParameter, match="takes no token ids"):
        await echo_runtime().embed([[1, 2]])


def test_logprobs_cross_the_p2p_wire_as_json() -> None:
    import json

    from haif.p2p.wire import decode_event, decode_outputs, encode_event, encode_outputs
    from haif.runtimes.base import GenerationOutput, StreamEvent, TopToken

    entries = (TokenLogprob("Hé", None, "Hé".encode()), TokenLogprob("", -0.5, b"\xe9", (TopToken("\ufffd", -0.5, b"\xe9"),)))
    out = GenerationOutput("Hé", 3, 2, "stop", logprobs=entries)
    assert decode_outputs(json.loads(json.dumps(encode_outputs([out])))) == [out]
    event = StreamEvent("Hé", 2, 3, "length", index=1, logprobs=entries)
    assert decode_event(json.loads(json.dumps(encode_event(event)))) == event
    plain = StreamEvent("x", 1, 1)
    assert decode_event(json.loads(json.dumps(encode_event(plain)))) == plain
