"""Response shapes of issue 19, as ``haif.gateway.serving`` makes them: logprobs (chat's
``content`` entries, the legacy completions lists), tool calls (message.tool_calls,
finish_reason ``tool_calls``) and their streamed deltas, which reassemble to the whole answer."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from haif.envelope import Shaping
from haif.gateway.serving import StreamFormatter, chat_response, completion_response
from haif.runtimes.base import GenerationOutput, StreamEvent, TokenLogprob, TopToken

pytestmark = pytest.mark.unit


def entry(token: str, logprob: float | None = -0.5, *alternatives: str) -> TokenLogprob:
    top = tuple(TopToken(t, -1.0 - i, t.encode()) for i, t in enumerate(alternatives))
    return TokenLogprob(token, logprob, token.encode(), top)


HELLO = (entry("Hel", -0.1, "Hel", "He"), entry("lo", -0.2, "lo", "l"), entry("!", -0.3, "!", "?"))


def stream(fmt: StreamFormatter, events: list[StreamEvent]) -> list[dict[str, Any]]:
    chunks = []
    for event in events:
        chunks += [json.loads(c.model_dump_json()) for c in fmt.chunks(event)]
    return chunks


def reassemble(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """What the openai client's stream helpers build from the deltas, choice by choice."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)  # the official client's own model
        for choice in chunk["choices"]:
            c = out.setdefault(choice["index"], {"content": None, "tool_calls": {}, "finish": None, "logprobs": []})
            delta = choice["delta"]
            if delta.get("content"):
                c["content"] = (c["content"] or "") + delta["content"]
            for call in delta.get("tool_calls") or ():
                slot = c["tool_calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                slot["id"] = slot["id"] or call.get("id")
                fn = call.get("function") or {}
                slot["name"] = slot["name"] or fn.get("name")
                slot["arguments"] += fn.get("arguments") or ""
            if choice.get("logprobs"):
                c["logprobs"] += choice["logprobs"]["content"]
            if choice["finish_reason"]:
                c["finish"] = choice["finish_reason"]
    return out


# --- logprobs ----------------------------------------------------------------------------


def test_chat_logprobs_content_entries() -> None:
    out = GenerationOutput("Hello!", 3, 3, "stop", logprobs=HELLO)
    body = chat_response("m", [out], shaping=Shaping(logprobs=True)).model_dump(mode="json")
    ChatCompletion.model_validate(body)
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == "Hello!"
    assert content[0] == {
        "token": "Hel", "logprob": -0.1, "bytes": list(b"Hel"),
        "top_logprobs": [{"token": "Hel", "logprob": -1.0, "bytes": list(b"Hel")},
                         {"token": "He", "logprob": -2.0, "bytes": list(b"He")}],
    }
    plain = chat_response("m", [out]).model_dump(mode="json")
    assert plain["choices"][0]["logprobs"] is None  # not asked: not sent


def test_completion_legacy_logprobs_with_echoed_prompt() -> None:
    prompt = (entry("Say", None), entry(" hi", -2.0, " hi"))
    out = GenerationOutput("Say hiHello!", 2, 3, "length", logprobs=prompt + HELLO)
    body = completion_response("m", [out], shaping=Shaping(logprobs=True)).model_dump(mode="json")
    # The first echoed token has no logprob: null, as OpenAI and vLLM send it (the openai
    # client builds its models without validation, and keeps the None).
    assert openai.types.Completion.construct(**body).choices[0].logprobs.token_logprobs[0] is None
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["Say", " hi", "Hel", "lo", "!"]
    assert lp["token_logprobs"] == [None, -2.0, -0.1, -0.2, -0.3]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {" hi": -1.0}
    assert lp["text_offset"] == [0, 3, 6, 9, 11]


def test_streamed_logprobs_follow_their_text_and_offsets_continue() -> None:
    fmt = StreamFormatter("completion", "m", include_usage=False, shaping=Shaping(logprobs=True))
    chunks = stream(fmt, [StreamEvent("Hello", 2, 3, logprobs=HELLO[:2]), StreamEvent("!", 3, 3, "stop", logprobs=HELLO[2:])])
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0, 3], [5]]
    chat = StreamFormatter("chat", "m", include_usage=True, shaping=Shaping(logprobs=True))
    whole = reassemble(stream(chat, [StreamEvent("Hello", 2, 3, logprobs=HELLO[:2]),
                                     StreamEvent("!", 3, 3, "stop", logprobs=HELLO[2:])]))
    assert [e["token"] for e in whole[0]["logprobs"]] == ["Hel", "lo", "!"]


# --- tool calls ----------------------------------------------------------------------------

HERMES = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


@pytest.mark.parametrize(
    ("shaping", "text", "content", "calls"),
    [
        (Shaping(tool_mode="auto"), HERMES, "Sure.", [("get_weather", {"city": "Oslo"})]),
        (Shaping(tool_mode="auto"), "No tools needed.", "No tools needed.", []),
        (Shaping(tool_mode="required"), '[{"name":"a","arguments":{"x":1}},{"name":"b","arguments":{}}]', None,
         [("a", {"x": 1}), ("b", {})]),
        (Shaping(tool_mode="named", tool_name="get_weather"), '{"city":"Oslo"}', None,
         [("get_weather", {"city": "Oslo"})]),
    ],
    ids=["auto-call", "auto-text", "required", "named"],
)
def test_tool_calls_whole_and_streamed(shaping: Shaping, text: str, content: str | None, calls: list[Any]) -> None:
    out = GenerationOutput(text, 5, 9, "stop")
    body = chat_response("m", [out], shaping=shaping).model_dump(mode="json")
    ChatCompletion.model_validate(body)
    choice = body["choices"][0]
    assert choice["message"]["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"] or ()]
    assert got == calls
    assert choice["finish_reason"] == ("tool_calls" if calls else "stop")
    for c in choice["message"]["tool_calls"] or ():
        assert c["type"] == "function" and c["id"].startswith("call_")

    for size in (1, 3, 8, 100):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        events = [StreamEvent(p, i + 1, 5) for i, p in enumerate(pieces)]
        events[-1] = StreamEvent(pieces[-1], len(pieces), 5, "stop")
        fmt = StreamFormatter("chat", "m", include_usage=True, shaping=shaping)
        chunks = stream(fmt, events)
        whole = reassemble(chunks)[0]
        assert whole["content"] == content
        assert [(t["name"], json.loads(t["arguments"])) for t in whole["tool_calls"].values()] == calls
        assert whole["finish"] == choice["finish_reason"]
        assert chunks[-1]["usage"]["completion_tokens"] == len(pieces)
        ids = [t["id"] for t in whole["tool_calls"].values()]
        assert all(i and i.startswith("call_") for i in ids) and len(set(ids)) == len(ids)


def test_a_tool_call_cut_by_max_tokens_is_no_call() -> None:
    out = GenerationOutput('[{"name":"a","argu', 5, 9, "length")
    choice = chat_response("m", [out], shaping=Shaping(tool_mode="required")).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content == '[{"name":"a","argu'


def test_each_choice_numbers_its_own_calls() -> None:
    shaping = Shaping(tool_mode="auto")
    outs = [GenerationOutput(HERMES, 5, 9, "stop"), GenerationOutput(HERMES + HERMES, 5, 18, "stop")]
    body = chat_response("m", outs, n_choices=2, shaping=shaping)
    assert [len(c.message.tool_calls or ()) for c in body.choices] == [1, 2]
    fmt = StreamFormatter("chat", "m", include_usage=False, n_choices=2, shaping=shaping)
    events = [StreamEvent(HERMES, 9, 5, index=1), StreamEvent(HERMES, 9, 5, "stop", index=0),
              StreamEvent(HERMES, 18, 5, "stop", index=1)]
    whole = reassemble(stream(fmt, events))
    assert sorted(whole[0]["tool_calls"]) == [0] and sorted(whole[1]["tool_calls"]) == [0, 1]
    assert whole[0]["finish"] == whole[1]["finish"] == "tool_calls"
    assert fmt.finished


def test_logprobs_held_with_markup_leave_with_the_next_chunk() -> None:
    shaping = Shaping(logprobs=True, tool_mode="auto")
    fmt = StreamFormatter("chat", "m", include_usage=False, shaping=shaping)
    held = fmt.event(StreamEvent("<tool_", 1, 5, logprobs=(entry("<tool_"),)))
    assert held is None  # maybe markup: nothing to say yet
    chunk = fmt.event(StreamEvent("x", 2, 5, "stop", logprobs=(entry("x"),)))
    assert chunk is not None and chunk.choices[0].delta.content == "<tool_x"
    assert [e.token for e in chunk.choices[0].logprobs.content] == ["<tool_", "x"]
