"""Constrained decoding on the torch runtime: tiny-llama's random weights write valid JSON
only because the grammar makes them; grammars are compiled once per schema; a guided row
leaves the others of its batch alone; what xgrammar cannot enforce is refused by name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from haif.exceptions import InvalidRequest
from haif.gateway import toolcalls
from haif.protocol import ChatTool
from haif.runtimes import tools
from haif.runtimes.base import Guide, SamplingParams
from haif.runtimes.grammar import unsupported_feature
from haif.runtimes.torch import TorchRuntime
from tests.support import tiny
from tests.support.aio import run_sync

pytestmark = pytest.mark.unit

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city"],
        },
        "pet": {"type": "boolean"},
    },
    "required": ["name", "age", "kind", "address"],
    "additionalProperties": False,
}
PROMPT = "Describe the person as JSON:"


def schema_guide(schema: dict[str, Any]) -> Guide:
    return Guide("json_schema", tools.canonical(schema))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchRuntime]:
    rt = tiny.runtime(tiny.model_dir(tmp_path_factory), torch={"max_batch_size": 16, "max_wait_ms": 30})
    yield rt
    run_sync(rt.unload())


async def run_all(rt: TorchRuntime, params: list[SamplingParams], prompt: str = PROMPT) -> list[Any]:
    async def run() -> list[Any]:
        return list(await asyncio.gather(*(rt.generate(prompt, p) for p in params)))

    return await run()


async def test_json_schema_output_validates_on_random_weights(runtime: TorchRuntime) -> None:
    guide = schema_guide(PERSON)
    outs = await run_all(runtime, [SamplingParams(max_tokens=200, temperature=1.0, seed=s, guide=guide) for s in range(24)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 12  # samples, not one answer
    plain = await run_all(runtime, [SamplingParams(max_tokens=60, temperature=1.0, seed=s) for s in range(4)])
    assert not any(_is_json(o.text) for o in plain)  # without the grammar: not JSON


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_greedy_guided_output_validates_and_repeats(runtime: TorchRuntime) -> None:
    params = SamplingParams(max_tokens=200, temperature=0.0, guide=schema_guide(PERSON))
    first, again = await run_all(runtime, [params, params])
    assert first.text == again.text
    jsonschema.validate(json.loads(first.text), PERSON)


async def test_json_object_is_an_object(runtime: TorchRuntime) -> None:
    outs = await run_all(runtime, [SamplingParams(max_tokens=256, temperature=1.0, seed=s, guide=Guide("json_object"))
                             for s in range(8)])
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished
    for out in finished:
        assert isinstance(json.loads(out.text), dict)
    for out in outs:  # cut by max_tokens, it is still the start of an object
        assert out.text.startswith("{")


async def test_a_schema_compiles_once(runtime: TorchRuntime) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    guide = schema_guide(schema)
    await run_all(runtime, [SamplingParams(max_tokens=20, temperature=0.0, guide=guide)])
    compiled = runtime._grammar.compiled
    outs = await run_all(runtime, [SamplingParams(max_tokens=20, temperature=1.0, seed=s, guide=guide) for s in range(6)])
    assert runtime._grammar.compiled == compiled
    assert {json.loads(o.text)["ok"] for o in outs} <= {True, False}


async def test_a_guided_row_leaves_the_rest_of_its_batch_alone(runtime: TorchRuntime) -> None:
    plain = tiny.greedy(24)
    guided = SamplingParams(max_tokens=200, temperature=0.0, guide=schema_guide(PERSON))
    solo = (await run_all(runtime, [plain]))[0].text
    solo_guided = (await run_all(runtime, [guided]))[0].text
    batch = await run_all(runtime, [plain, guided, plain, guided])
    assert [o.text for o in batch] == [solo, solo_guided, solo, solo_guided]


async def test_guided_choices_with_penalties_stop_and_logprobs(runtime: TorchRuntime) -> None:
    guide = schema_guide(PERSON)
    params = [
        SamplingParams(max_tokens=200, temperature=1.0, seed=s, guide=guide, presence_penalty=1.0,
                       repetition_penalty=1.3, logprobs=2, min_tokens=3)
        for s in range(6)
    ]
    for out in await run_all(runtime, params):
        jsonschema.validate(json.loads(out.text), PERSON)
        assert "".join(e.token for e in out.logprobs) == out.text
        assert all(len(e.top) == 2 for e in out.logprobs)


async def test_required_tool_calls_follow_their_tools_schemas(runtime: TorchRuntime) -> None:
    weather = ChatTool.model_validate({"type": "function", "function": {
        "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False}}})
    clock = ChatTool.model_validate({"type": "function", "function": {"name": "get_time"}})
    by_name = {t.function.name: t for t in (weather, clock)}
    guide = tools.tool_guide([weather, clock], "required", None, parallel=False)
    assert guide is not None
    outs = await run_all(runtime, [SamplingParams(max_tokens=120, temperature=1.0, seed=s, guide=guide) for s in range(12)])
    for out in outs:
        content, calls = toolcalls.read_all(toolcalls.ArrayReader(), out.text)
        assert content is None and len(calls) == 1, out.text  # parallel_tool_calls off: one call
        (call,) = calls
        jsonschema.validate(json.loads(call.arguments), tools.parameters(by_name[call.name or ""]))
    named = tools.tool_guide([weather, clock], "named", "get_weather", parallel=True)
    for out in await run_all(runtime, [SamplingParams(max_tokens=60, temperature=1.0, seed=s, guide=named) for s in range(6)]):
        jsonschema.validate(json.loads(out.text), tools.parameters(weather))


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "strin"}, 'Unsupported type "strin"'),
        ({"type": "integer", "multipleOf": 3}, "multipleOf (at $)"),
        ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems (at $.properties.a)"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties (at $)"),
        ({"type": "string", "format": "ipv5"}, "format 'ipv5'"),
        ({"type": "string", "minLength": -1}, "EBNF parser error"),  # only xgrammar's parser sees it
        ({"type": "integer", "minimum": 10**40}, "MAX_INT64"),
    ],
)
async def test_an_unsupported_schema_is_a_400_naming_it(runtime: TorchRuntime, schema: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidRequest, match="response_format") as info:
        await runtime.generate(PROMPT, SamplingParams(max_tokens=8, guide=schema_guide(schema)))
    assert named in info.value.message
    assert "json_schema_converter.cc" not in info.value.message


async def test_a_schema_that_is_not_json_is_a_400(runtime: TorchRuntime) -> None:
    with pytest.raises(InvalidRequest, match="not JSON"):
        await runtime.generate(PROMPT, SamplingParams(max_tokens=8, guide=Guide("json_schema", "{nope")))


def test_unsupported_feature_walks_the_whole_schema() -> None:
    assert unsupported_feature(PERSON) is None
    deep = {"anyOf": [{"type": "string"}, {"type": "array", "items": [{"type": "number", "multipleOf": 2}]}]}
    assert unsupported_feature(deep) == "multipleOf (at $.anyOf[1].items[0])"
    assert unsupported_feature({"enum": [{"multipleOf": 3, "type": "integer"}]}) is None  # values, not schemas
    assert unsupported_feature({"allOf": [{"type": "string"}, {"enum": ["a"]}]}) == "allOf with several branches (at $)"


async def test_properties_come_in_the_schemas_order(runtime: TorchRuntime) -> None:
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"enum": [1, 2]}},
              "required": ["zeta", "alpha"]}
    out = (await run_all(runtime, [SamplingParams(max_tokens=30, temperature=1.0, seed=2, guide=schema_guide(schema))]))[0]
    assert list(json.loads(out.text)) == ["zeta", "alpha"]


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "format": {}}, "format {}"),
        ({"not": {"type": "string"}}, "not (at $)"),
        ({"type": "object", "properties": {"a": {"if": {}, "then": {}}}}, "if (at $.properties.a)"),
    ],
)
def test_keywords_xgrammar_would_ignore_are_named(schema: dict[str, Any], named: str) -> None:
    found = unsupported_feature(schema)
    assert found is not None and found.startswith(named)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (b'"caf\xc3\xa9 \xe9\x9b\xa3 \xf0\x9f\x98\x80"', True),  # any character of UTF-8
        (b'"\xed\xbd\xbe"', False),  # a UTF-16 surrogate: not UTF-8 (xgrammar lets it through)
        (b'"a\x04b"', False),  # a raw control character: not JSON (xgrammar lets it through)
        (b'"\xf0\x9f\x98"', False),  # a character cut short
    ],
)
@pytest.mark.parametrize("bounded", [True, False], ids=["maxLength", "unbounded"])
def test_json_strings_are_utf8_without_control_characters(
    runtime: TorchRuntime, value: bytes, accepted: bool, bounded: bool
) -> None:
    import xgrammar as xgr

    from haif.runtimes.grammar import GrammarCompiler

    string = {"type": "string", "maxLength": 12} if bounded else {"type": "string"}
    schema = {"type": "object", "properties": {"s": string}, "required": ["s"]}
    grammar = GrammarCompiler(runtime._tokenizer, runtime._vocab_size, runtime._eos_ids)
    matcher = xgr.GrammarMatcher(grammar.compile(schema_guide(schema)))
    assert matcher.accept_string(b'{"s":' + value + b"}") is accepted
    # Escapes: in unbounded strings (xgrammar's bounded ones take no backslash at all).
    escaped = xgr.GrammarMatcher(grammar.compile(schema_guide(schema)))
    assert escaped.accept_string(b'{"s":"a\\u00e9\\n"}') is not bounded


async def test_requests_with_a_new_schema_at_once_compile_it_once(runtime: TorchRuntime) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    before = runtime._grammar.compiled if runtime._grammar else 0
    await run_all(runtime, [SamplingParams(max_tokens=12, temperature=1.0, seed=s, guide=schema_guide(schema)) for s in range(8)])
    assert runtime._grammar.compiled == before + 1
