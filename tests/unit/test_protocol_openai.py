"""The request fields of issue 19: what the protocol accepts, what it refuses (422), and what
the edge refuses by name (400): unsupported parameters, the combinations that make no sense,
the operator's limits."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from haif.config import LimitsConfig
from haif.envelope import RequestContext, Shaping, build_work_item, check_limits, payload_bytes
from haif.exceptions import InvalidRequest, UnprocessableRequest, UnsupportedParameter
from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def completion(**kw: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "tiny-llama", "prompt": "hi", **kw})


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_the_sampling_fields_sdks_send_are_accepted() -> None:
    # What the openai client and frameworks send, zeros included.
    req = chat(presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u-1", top_logprobs=None,
               logprobs=False, parallel_tool_calls=True, response_format={"type": "text"})
    assert (req.presence_penalty, req.frequency_penalty, req.logit_bias_ids()) == (0, 0, {})
    extras = completion(repetition_penalty=1.2, top_k=40, min_p=0.05, min_tokens=2, stop_token_ids=[5, 7],
                        ignore_eos=True, logit_bias={"12": -100, "7": 100}, echo=True, logprobs=5)
    assert extras.logit_bias_ids() == {12: -100.0, 7: 100.0}
    assert extras.logprobs_count() == 5 and extras.echo


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0.0),
        ("min_p", 1.5), ("top_k", -2), ("min_tokens", -1), ("stop_token_ids", [-1]),
        ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {str(i): 1 for i in range(301)}),
        ("logprobs", 6), ("prompt", [1, "a"]), ("prompt", [[]]), ("prompt", [True, 2]),
    ],
)
def test_completion_fields_out_of_bounds_are_422(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        completion(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(
    "extra",
    [
        {"top_logprobs": 21},
        {"tool_choice": "required"},  # no tools
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [WEATHER, WEATHER]},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "xml"}},
        {"messages": [{"role": "assistant", "content": None}]},
        {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
    ],
)
def test_chat_fields_that_make_no_sense_are_422(extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        chat(**extra)


def test_prompts_and_inputs_as_token_ids() -> None:
    assert completion(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    emb = EmbeddingRequest.model_validate({"model": "m", "input": [[5, 6], [7]]})
    assert emb.inputs() == [[5, 6], [7]]
    assert EmbeddingRequest.model_validate({"model": "m", "input": [5, 6]}).inputs() == [[5, 6]]
    assert payload_bytes(completion(prompt=[[1, 2], [3]])) == 12  # 4 bytes a token id


def test_a_tool_round_trip_parses() -> None:
    req = chat(tools=[WEATHER], tool_choice="auto", messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    assert req.tool_mode() == ("auto", None)
    assert req.messages[1].tool_calls_json() == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    assert req.messages[2].text() == "sunny"
    assert chat(tools=[WEATHER]).tool_mode() == ("auto", None)
    assert chat(tools=[WEATHER], tool_choice="none").tool_mode() == ("none", None)
    named = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_mode() == ("named", "get_weather")
    assert chat().tool_mode() == ("none", None)


def test_json_schema_response_format_keeps_its_schema_key() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}})
    assert req.response_format.json_schema.schema_ == schema  # type: ignore[union-attr]
    dumped = req.model_dump(mode="json", exclude_unset=True)
    assert dumped["response_format"]["json_schema"]["schema"] == schema
    assert ChatCompletionRequest.model_validate(dumped) == req  # the DLQ and replays read it back


# --- at the edge: 400s that name what they refuse ------------------------------------------


LIMITS = LimitsConfig()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[1] (type 'image_url')"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
         "messages[0].content[0] (type 'input_audio')"),
        ({"audio": {"voice": "alloy", "format": "mp3"}, "modalities": ["text", "audio"]}, "audio, modalities (audio)"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ],
)
def test_unsupported_parameters_are_a_400_naming_them_and_the_model(extra: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        check_limits(chat(**extra), LIMITS)
    assert info.value.status_code == 400 and info.value.code == "unsupported_parameter"
    assert named in info.value.message and "'tiny-llama'" in info.value.message
    check_limits(chat(modalities=["text"]), LIMITS)  # text is what it does


@pytest.mark.parametrize(
    ("body", "error", "text"),
    [
        (chat(top_logprobs=3), InvalidRequest, "'top_logprobs' needs 'logprobs': true"),
        (chat(logprobs=True, top_logprobs=5), UnprocessableRequest, "'top_logprobs' is 5; the limit is 4"),
        (completion(logprobs=5), UnprocessableRequest, "'logprobs' is 5; the limit is 4"),
        (completion(min_tokens=20, max_tokens=10), InvalidRequest, "'min_tokens' (20) exceeds 'max_tokens' (10)"),
        (chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), InvalidRequest,
         "cannot be combined"),
    ],
)
def test_combinations_and_limits(body: Any, error: type[Exception], text: str) -> None:
    with pytest.raises(error) as info:
        check_limits(body, LimitsConfig(max_logprobs=4))
    assert text in str(info.value)


def test_the_work_item_carries_the_shaping_and_the_user() -> None:
    ctx = RequestContext.new(timeout_s=5, api_key=None)
    item = build_work_item("chat", chat(logprobs=True, top_logprobs=2, tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False, user="end-7"), ctx, LIMITS)
    assert item.shaping == Shaping(logprobs=True, tool_mode="named", tool_name="get_weather", parallel_tool_calls=False)
    assert item.user == "end-7"
    plain = build_work_item("completion", completion(), ctx, LIMITS)
    assert plain.shaping == Shaping() and plain.user is None
    assert build_work_item("completion", completion(logprobs=0), ctx, LIMITS).shaping.logprobs
    # the tools a template renders count in the prompt's size (the quota's estimate)
    assert build_work_item("chat", chat(tools=[WEATHER]), ctx, LIMITS).payload_bytes > 100
