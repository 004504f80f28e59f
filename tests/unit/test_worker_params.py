"""What a worker hands its runtime: every sampling field of the request, the grammar of its
``response_format`` or forced tool call, the conversation with tool calls and answers, the
tools for the chat template; and tiny-llama's template rendering them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.params import chat_messages, guide, sampling_params
from haif.protocol import ChatCompletionRequest, CompletionRequest
from haif.runtimes import hf, tools
from haif.runtimes.base import Guide, SamplingParams
from tests.support import tiny

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_every_sampling_field_reaches_the_runtime() -> None:
    body = CompletionRequest.model_validate({
        "model": "m", "prompt": "x", "temperature": 0.5, "top_p": 0.9, "stop": ["a"], "seed": 3,
        "top_k": 20, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.1, "logit_bias": {"9": 5, "2": -1}, "min_tokens": 2,
        "stop_token_ids": [4], "ignore_eos": True, "logprobs": 2, "echo": True,
    })
    assert sampling_params(body, 16) == SamplingParams(
        max_tokens=16, temperature=0.5, top_p=0.9, stop=("a",), seed=3, top_k=20, min_p=0.1,
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
        logit_bias=((2, -1.0), (9, 5.0)), min_tokens=2, stop_token_ids=(4,), ignore_eos=True,
        logprobs=2, echo=True,
    )
    assert sampling_params(CompletionRequest(model="m", prompt="x", top_k=-1), 4).top_k == 0
    assert sampling_params(chat(logprobs=True), 4).logprobs == 0
    assert sampling_params(chat(logprobs=True, top_logprobs=7), 4).logprobs == 7
    assert sampling_params(chat(), 4).logprobs is None


def test_the_grammar_comes_from_response_format_or_a_forced_tool_call() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    reordered = {"properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "type": "object"}
    first = guide(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    again = guide(chat(response_format={"type": "json_schema", "json_schema": {"name": "y", "schema": dict(schema)}}))
    assert first == again == Guide("json_schema", tools.canonical(schema))  # one cache entry
    other = guide(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": reordered}}))
    assert other is not None and list(json.loads(other.schema or "")["properties"]) == ["a", "b"]  # order kept
    assert guide(chat(response_format={"type": "json_object"})) == Guide("json_object")
    assert guide(chat(response_format={"type": "text"})) is None
    assert guide(chat(tools=[WEATHER])) is None  # auto: the model decides
    required = guide(chat(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False))
    assert required is not None and required.param == "tool_choice"
    array = json.loads(required.schema or "")
    assert array["maxItems"] == 1 and array["minItems"] == 1
    assert [v["properties"]["name"] for v in array["items"]["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert array["items"]["anyOf"][1]["properties"]["arguments"] == tools.NO_ARGUMENTS
    named = guide(chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named is not None and json.loads(named.schema or "") == WEATHER["function"]["parameters"]


def test_the_conversation_and_tools_as_the_template_reads_them(tmp_path_factory: pytest.TempPathFactory) -> None:
    body = chat(tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    messages = chat_messages(body)
    assert messages[2].content == "" and messages[2].tool_calls[0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[3].tool_call_id == "call_1"
    rendered = tools.rendered(body.tools)
    assert rendered == [WEATHER]
    assert tools.rendered(None) is None

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir(tmp_path_factory))
    prompt = hf.render_chat(tokenizer, messages, "tiny-llama", rendered)
    assert prompt.startswith("<s><|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert ('<|im_start|>assistant\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            "</tool_call><|im_end|>\n") in prompt
    assert prompt.endswith("<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
    bare = hf.render_chat(tokenizer, chat_messages(chat()), "tiny-llama")
    assert bare == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no tools: as before

