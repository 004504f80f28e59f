"""haif.protocol request validation, and the Gateway's response/stream formatting."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from haif.envelope import EmbeddingResult
from haif.gateway.serving import (
    StreamFormatter,
    chat_response,
    completion_response,
)
from haif.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChunk,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    embedding_response,
)
from haif.runtimes.base import GenerationOutput, StreamEvent

pytestmark = pytest.mark.unit


def completion(**kw: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "echo", "prompt": "hi", **kw})


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


# --- requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "extra"),
    [
        (completion, {"suffix": "x"}),
        (completion, {"best_of": 2}),
        (chat, {"functions": []}),
        (lambda **kw: EmbeddingRequest.model_validate({"model": "m", "input": "x", **kw}), {"foo": 1}),
    ],
)
def test_unknown_fields_rejected(factory: Any, extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        factory(**extra)
    (name,) = extra
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert name in error_locs(info.value)[0]


def test_unknown_field_in_message_rejected() -> None:
    with pytest.raises(ValidationError, match="extra_forbidden"):
        chat(messages=[{"role": "user", "content": "hi", "audio_id": "x"}])
    with pytest.raises(ValidationError, match="only 'assistant' messages carry 'tool_calls'"):
        chat(messages=[{"role": "user", "content": "hi", "tool_calls": []}])


@pytest.mark.parametrize(
    "make",
    [
        lambda: completion(prompt="\ud800"),
        lambda: completion(prompt=["ok", "bad \udfff"]),
        lambda: chat(messages=[{"role": "user", "content": "x\ud800"}]),
        lambda: chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
        lambda: completion(stop="\ud800"),
        lambda: EmbeddingRequest(model="m", input="\ud800"),
        lambda: completion(model="m\ud800"),
    ],
)
def test_lone_surrogates_rejected(make: Any) -> None:
    with pytest.raises(ValidationError, match="lone surrogate"):
        make()


def test_valid_non_ascii_accepted() -> None:
    assert completion(prompt="héllo 😀 世界").prompts() == ["héllo 😀 世界"]


@pytest.mark.parametrize("n", [0, -1, 129])
def test_n_is_between_one_and_128(n: int) -> None:
    with pytest.raises(ValidationError) as info:
        completion(n=n)
    assert error_locs(info.value) == ["n"]
    assert completion().n == 1
    assert completion(n=128).n == 128  # the API's bound; limits.max_choices is the operator's


@pytest.mark.parametrize("temperature", [-0.1, 2.01])
def test_temperature_out_of_bounds(temperature: float) -> None:
    with pytest.raises(ValidationError) as info:
        chat(temperature=temperature)
    assert error_locs(info.value) == ["temperature"]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0])
def test_temperature_in_bounds(temperature: float) -> None:
    assert chat(temperature=temperature).temperature == temperature


def test_top_p_bounds() -> None:
    with pytest.raises(ValidationError):
        completion(top_p=0)
    with pytest.raises(ValidationError):
        completion(top_p=1.1)


def test_prompt_list_must_be_non_empty() -> None:
    with pytest.raises(ValidationError):
        completion(prompt=[])
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": []})
    with pytest.raises(ValidationError):
        chat(messages=[])


def test_prompts_and_stop_lists() -> None:
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion().stop_list() == ()
    assert completion(stop="x").stop_list() == ("x",)
    assert completion(stop=["x", "y"]).stop_list() == ("x", "y")
    with pytest.raises(ValidationError):
        completion(stop="")
    with pytest.raises(ValidationError):
        completion(max_tokens=0)


def test_message_content_parts_concatenated() -> None:
    req = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        ]
    )
    assert [m.text() for m in req.messages] == ["be brief", "Hello, world"]


def test_message_role_and_part_type_checked() -> None:
    with pytest.raises(ValidationError, match="tool_call_id"):
        chat(messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "narrator", "content": "x"}])
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "user", "content": [{"type": "video", "text": "x"}]}])
    # Image parts parse, to be refused by name at the edge (a 400, not a 422).
    req = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert req.unsupported() == ["messages[0].content[0] (type 'image_url')"]


def test_include_usage() -> None:
    assert chat().include_usage() is False
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage() is True
    assert chat(stream=True, stream_options={}).include_usage() is False


def test_error_response_refuses_traces() -> None:
    ok = {"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}}
    assert ErrorResponse.model_validate(ok).error.message == "bad"
    with pytest.raises(ValidationError):
        ErrorResponse.model_validate(
            {"error": {"message": "Traceback (most recent call last):\n  ...", "type": "internal_error"}}
        )


# --- responses ------------------------------------------------------------------------


def test_completion_and_chat_responses() -> None:
    outs = [GenerationOutput("a", 2, 1, "stop"), GenerationOutput("b c", 3, 2, "length")]
    resp = completion_response("echo", outs)
    assert resp.id.startswith("cmpl-")
    assert [c.text for c in resp.choices] == ["a", "b c"]
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.model_dump() == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    chat_resp = chat_response("echo", [GenerationOutput("hey", 4, 1, "stop")])
    assert chat_resp.id.startswith("chatcmpl-")
    assert chat_resp.choices[0].message.role == "assistant"
    assert chat_resp.choices[0].message.content == "hey"
    assert chat_resp.usage.total_tokens == 5


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4"])
def test_embedding_base64_decodes_to_the_same_floats(dtype: Any) -> None:
    vectors = np.array([[0.1, -2.5, 3.25e-8, 1e6], [0.0, 1.0, -1.0, 0.5]], dtype=dtype)
    result = EmbeddingResult(model="minilm", vectors=vectors, prompt_tokens=7)
    floats = embedding_response(result.model, result.prompt_tokens, vectors, "float")
    b64 = embedding_response(result.model, result.prompt_tokens, vectors, "base64")
    assert b64.model == "minilm"
    assert b64.usage.prompt_tokens == 7 and b64.usage.total_tokens == 7
    assert [d.index for d in b64.data] == [0, 1]
    for f, b, row in zip(floats.data, b64.data, vectors, strict=True):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(row, dtype=np.float32))
        np.testing.assert_array_equal(decoded, np.asarray(f.embedding, dtype=np.float32))
    # And through JSON, as a client sees it.
    wire = json.loads(b64.model_dump_json())
    decoded = np.frombuffer(base64.b64decode(wire["data"][1]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [0.0, 1.0, -1.0, 0.5]


def test_chat_stream_chunks() -> None:
    fmt = StreamFormatter("chat", "echo", include_usage=True)
    first = fmt.first()
    assert isinstance(first, ChatCompletionChunk)
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].finish_reason is None
    content = fmt.event(StreamEvent("Hello", 1, 3))
    assert content.choices[0].delta.content == "Hello"
    assert content.choices[0].delta.role is None
    assert content.choices[0].finish_reason is None
    assert fmt.event(StreamEvent("", 2, 3)) is None  # nothing to say
    finish = fmt.event(StreamEvent("", 2, 3, "length"))
    assert finish.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None
    usage = fmt.usage_chunk()
    assert usage.choices == []
    assert usage.usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert {first.id, content.id, finish.id, usage.id} == {fmt.id}
    assert fmt.id.startswith("chatcmpl-")


def test_chat_stream_without_usage() -> None:
    fmt = StreamFormatter("chat", "echo", include_usage=False)
    assert fmt.first() is not None
    last = fmt.event(StreamEvent("x", 1, 1, "stop"))
    assert last.choices[0].delta.content == "x"
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is None
    assert fmt.usage_chunk() is None


def test_completion_stream_chunks() -> None:
    fmt = StreamFormatter("completion", "echo", include_usage=True)
    assert fmt.first() is None  # no role chunk outside chat
    chunk = fmt.event(StreamEvent("abc", 1, 2))
    assert isinstance(chunk, CompletionChunk)
    assert chunk.object == "text_completion"
    assert chunk.choices[0].text == "abc"
    end = fmt.event(StreamEvent("", 1, 2, "stop"))
    assert end.choices[0].finish_reason == "stop"
    usage = fmt.usage_chunk()
    assert isinstance(usage, CompletionChunk)
    assert usage.usage.total_tokens == 3
    assert StreamFormatter("completion", "echo", include_usage=False).usage_chunk() is None
