"""Issue 19 through the whole platform with the official `openai` client, on tiny-llama (torch)
and tiny-llama-vllm: sampling penalties and vLLM's extras, logprobs, token-id prompts,
structured outputs (response_format, ``parse``), tool calling (required, named, auto, a
round trip with a tool's answer), plain and streamed; what no model here supports is a 400
naming it and the model; the request's `user` lands on its job."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest

from tests.support.deployment import Deployment
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MODELS = ["tiny-llama", "tiny-llama-vllm"]
ASK = [{"role": "user", "content": "Tell me about the old lighthouse by the river."}]


@pytest.fixture(scope="module")
def client(haif: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{haif.url}/v1", api_key=haif.api_key, max_retries=0, timeout=120)


def streamed_chat(client: openai.OpenAI, **kwargs: Any) -> dict[int, dict[str, Any]]:
    """A streamed chat answer put together choice by choice, as the client's helpers do."""
    out: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            c = out.setdefault(choice.index, {"content": "", "calls": {}, "finish": None, "logprobs": []})
            c["content"] += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                slot = c["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                slot["id"] = slot["id"] or call.id
                if call.function is not None:
                    slot["name"] = slot["name"] or call.function.name
                    slot["arguments"] += call.function.arguments or ""
            if choice.logprobs is not None and choice.logprobs.content:
                c["logprobs"] += choice.logprobs.content
            if choice.finish_reason is not None:
                assert c["finish"] is None, "a choice finished twice"
                c["finish"] = choice.finish_reason
    for c in out.values():
        c["usage"] = usage
    return out


def calls_of(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


# --- sampling penalties and vLLM's extra parameters ---------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_penalties_change_the_answer_against_the_same_seed(client: openai.OpenAI, model: str) -> None:
    base: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 32, "temperature": 0, "seed": 7}
    penalties = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
    plain = client.chat.completions.create(**base).choices[0].message.content
    penalized = client.chat.completions.create(**base, **penalties).choices[0].message.content
    assert penalized != plain
    assert client.chat.completions.create(**base, **penalties).choices[0].message.content == penalized
    assert streamed_chat(client, **base, **penalties)[0]["content"] == penalized
    repeated = client.chat.completions.create(**base, extra_body={"repetition_penalty": 1.8})
    assert repeated.choices[0].message.content != plain


@pytest.mark.parametrize("model", MODELS)
def test_vllm_extra_parameters_are_honoured(client: openai.OpenAI, model: str) -> None:
    extras = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True}
    reply = client.completions.create(model=model, prompt="The farmer", max_tokens=12, temperature=0.8, seed=3,
                                      extra_body=extras)
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 12)  # EOS ignored
    again = client.completions.create(model=model, prompt="The farmer", max_tokens=12, temperature=0.8, seed=3,
                                      extra_body=extras)
    assert again.choices[0].text == reply.choices[0].text


@pytest.mark.parametrize("model", MODELS)
def test_a_logit_bias_of_100_makes_every_token_the_same(client: openai.OpenAI, model: str) -> None:
    # A longer deadline: vLLM's CPU engine builds its logit-bias path on first use, which
    # took over a minute once on a loaded CI machine (its engine core stalled, then served).
    reply = client.with_options(timeout=300).completions.create(
        model=model, prompt="The farmer", max_tokens=6, temperature=1.0, seed=1,
        logit_bias={"300": 100}, logprobs=0, extra_headers={"X-Request-Timeout": "240"},
    )
    tokens = reply.choices[0].logprobs.tokens
    assert len(tokens) == 6 and len(set(tokens)) == 1
    assert reply.choices[0].text == tokens[0] * 6


# --- logprobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_top_logprobs_give_three_alternatives_and_the_tokens_join_to_the_text(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 16, "temperature": 0}
    reply = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert len(content) == reply.usage.completion_tokens or choice.finish_reason == "stop"
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob <= 0 and token.top_logprobs[0].logprob >= token.top_logprobs[2].logprob
        assert isinstance(token.bytes, list)
    streamed = streamed_chat(client, **kwargs, logprobs=True, top_logprobs=3)[0]
    assert streamed["content"] == choice.message.content
    assert [t.token for t in streamed["logprobs"]] == [t.token for t in content]
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].logprobs is None
    assert plain.usage == reply.usage  # logprobs change nothing that is billed


@pytest.mark.parametrize("model", MODELS)
def test_completion_logprobs_and_echo(client: openai.OpenAI, model: str) -> None:
    prompt = "The teacher walked"
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, echo=True)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the prompt's first token
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert choice.text == prompt + plain.choices[0].text
    assert reply.usage == plain.usage
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert "".join(t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens) \
        == plain.choices[0].text


# --- prompts as token ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_prompts_as_token_ids(client: openai.OpenAI, model: str) -> None:
    one = client.completions.create(model=model, prompt=[1, 300, 301, 302], max_tokens=5, temperature=0)
    assert one.usage.prompt_tokens == 4 and one.choices[0].finish_reason in ("stop", "length")
    two = client.completions.create(model=model, prompt=[[1, 300], [1, 301, 302]], max_tokens=5, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        client.completions.create(model=model, prompt=[1, 9_999_999], max_tokens=5)


def test_embeddings_of_token_ids(client: openai.OpenAI) -> None:
    text = client.embeddings.create(model="minilm", input="hello world", encoding_format="float").data[0].embedding
    ids = client.embeddings.create(model="minilm", input=[[101, 7592, 2088, 102]], encoding_format="float")
    assert np.allclose(ids.data[0].embedding, text, atol=1e-4)  # BERT's ids of "hello world"
    assert ids.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        client.embeddings.create(model="minilm", input=[[101, 99_999_999, 102]])


# --- structured outputs ------------------------------------------------------------------------------


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]
    friendly: bool
    toys: list[Annotated[str, pydantic.Field(max_length=6)]] = pydantic.Field(max_length=3)


PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                  "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "owner"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_output_validates_in_100_of_100_seeded_requests(client: openai.OpenAI, model: str) -> None:
    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe a pet."}], response_format=PET_FORMAT,
            max_tokens=200, temperature=1.0, seed=seed, n=5,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:  # choice i samples with seed + i: 100 seeds
        replies = list(pool.map(ask, range(0, 100, 5)))
    answers = [c.message.content for r in replies for c in r.choices]
    assert len(answers) == 100
    for reply in replies:
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PET_SCHEMA)
    assert len(set(answers)) > 50  # a hundred samples, not one answer
    # Seeded: the same request, the same answers, streamed too.
    streamed = streamed_chat(client, model=model, messages=[{"role": "user", "content": "Describe a pet."}],
                             response_format=PET_FORMAT, max_tokens=200, temperature=1.0, seed=15, n=5)
    assert [streamed[i]["content"] for i in range(5)] == [c.message.content for c in replies[3].choices]
    assert streamed[0]["usage"] == replies[3].usage


@pytest.mark.parametrize("model", MODELS)
def test_json_object_is_an_object(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=ASK, response_format={"type": "json_object"},
                                           max_tokens=256, temperature=0)
    content = reply.choices[0].message.content
    assert content.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("model", MODELS)
def test_parse_returns_the_pydantic_object(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        reply = client.beta.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
            max_tokens=200, temperature=1.0, seed=seed,
        )
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Pet)
        assert parsed.kind in ("cat", "dog", "fish") and 0 <= parsed.age <= 30


@pytest.mark.parametrize("model", MODELS)
def test_an_unsupported_schema_is_a_400_naming_it(client: openai.OpenAI, model: str) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "multipleOf": 3}}}
    with pytest.raises(openai.BadRequestError, match="multipleOf"):
        client.chat.completions.create(model=model, messages=ASK, response_format=bad, max_tokens=4)


# --- tool calling ----------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": {"type": "object", "properties": {}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def valid_calls(calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("model", MODELS)
def test_required_tool_calls_validate_against_their_tools(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": WEATHER_ASK, "tools": TOOLS, "tool_choice": "required",
                              "parallel_tool_calls": False, "max_tokens": 120, "temperature": 1.0}
    for seed in range(5):
        reply = client.chat.completions.create(**kwargs, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = calls_of(choice.message)
        assert len(calls) == 1
        valid_calls(calls)
        assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"
        streamed = streamed_chat(client, **kwargs, seed=seed)[0]
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == calls
        assert streamed["finish"] == "tool_calls" and not streamed["content"]
        (call,) = streamed["calls"].values()
        assert call["arguments"] == choice.message.tool_calls[0].function.arguments
    # Several calls allowed: every call is valid; one cut by max_tokens is the last, its
    # arguments cut (finish_reason "length"), as OpenAI's are.
    parallel = client.chat.completions.create(**{**kwargs, "parallel_tool_calls": True}, seed=11).choices[0]
    made = parallel.message.tool_calls
    assert made and parallel.finish_reason in ("tool_calls", "length")
    whole = made if parallel.finish_reason == "tool_calls" else made[:-1]
    valid_calls([(c.function.name, json.loads(c.function.arguments)) for c in whole])


@pytest.mark.parametrize("model", MODELS)
def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": WEATHER_ASK, "tools": TOOLS, "max_tokens": 80,
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                              "temperature": 1.0, "seed": 5, "n": 2}
    reply = client.chat.completions.create(**kwargs)
    streamed = streamed_chat(client, **kwargs)
    for choice in reply.choices:
        calls = calls_of(choice.message)
        assert [name for name, _ in calls] == ["get_weather"] and choice.finish_reason == "tool_calls"
        valid_calls(calls)
        again = streamed[choice.index]
        assert [(c["name"], json.loads(c["arguments"])) for c in again["calls"].values()] == calls
    assert streamed[0]["usage"] == reply.usage


@pytest.mark.parametrize("model", MODELS)
def test_a_round_trip_with_the_tools_answer_is_accepted(client: openai.OpenAI, model: str) -> None:
    first = client.chat.completions.create(model=model, messages=WEATHER_ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    message = first.choices[0].message
    call = message.tool_calls[0]
    messages = [*WEATHER_ASK, message, {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    replies = {}
    for tool_choice in ("auto", "none"):
        reply = replies[tool_choice] = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=16, temperature=0
        )
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.content is not None or choice.message.tool_calls
        if tool_choice == "none":
            assert choice.message.tool_calls is None
    # The template rendered the call and the answer: the prompt grew by both.
    assert replies["auto"].usage.prompt_tokens == replies["none"].usage.prompt_tokens > first.usage.prompt_tokens


def test_auto_reads_the_models_hermes_markup(client: openai.OpenAI) -> None:
    # The echo model answers with its prompt: markup in it comes back as a call.
    markup = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>'
    kwargs: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "Sure. " + markup}],
                              "tools": TOOLS, "max_tokens": 64}
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure. "
    assert calls_of(choice.message) == [("get_weather", {"city": "Oslo", "unit": "celsius"})]
    streamed = streamed_chat(client, **kwargs)[0]
    assert streamed["content"] == "Sure. " and streamed["finish"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == calls_of(choice.message)
    plain = client.chat.completions.create(**{**kwargs, "tool_choice": "none"})
    assert plain.choices[0].message.content == "Sure. " + markup and plain.choices[0].finish_reason == "stop"


# --- what stays unsupported: a 400 naming it and the model ---------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "image_url"),
        ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
        ({"prediction": {"type": "content", "content": "Hello"}}, "prediction"),
    ],
)
@pytest.mark.parametrize("model", [*MODELS, "echo"])
def test_unsupported_parameters_are_a_400_naming_them(client: openai.OpenAI, model: str, extra: dict[str, Any],
                                                      named: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert named in info.value.message and model in info.value.message
    assert info.value.code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_the_echo_runtime_refuses_what_it_cannot_honour(client: openai.OpenAI, extra: dict[str, Any], named: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="echo", messages=ASK, max_tokens=4, **extra)
    assert named in info.value.message and "'echo'" in info.value.message
    ok = client.chat.completions.create(model="echo", messages=ASK, max_tokens=4, logprobs=True, top_logprobs=1,
                                        presence_penalty=0, frequency_penalty=0, seed=1)
    assert "".join(t.token for t in ok.choices[0].logprobs.content) == ok.choices[0].message.content


# --- the end user on the job ----------------------------------------------------------------------------


def test_the_user_is_recorded_on_the_job(client: openai.OpenAI, haif: Deployment) -> None:
    reply = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=4, user="end-user-42")
    with httpx.Client(base_url=haif.url, headers=haif.headers(), timeout=30) as http:
        job = wait_for(lambda: (r := http.get(f"/v1/jobs/{reply.id}").json()).get("state") == "succeeded" and r,
                       15, what="the job row")
    assert job["user"] == "end-user-42"
