"""Tool calls read back from generated text: the hermes markup (``auto``), the forced array
(``required``) and the named function's arguments; streamed in any pieces, the same answer."""

from __future__ import annotations

import json

import pytest

from haif.gateway.toolcalls import (
    ArgumentsReader,
    ArrayReader,
    Call,
    HermesReader,
    Reader,
    read_all,
    reader,
)

pytestmark = pytest.mark.unit

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
CLOCK = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def pieces_of(read: Reader, text: str, size: int) -> tuple[str | None, list[Call]]:
    """``text`` fed ``size`` characters at a time, put together as a client would."""
    out = []
    for i in range(0, len(text), size):
        out += read.feed(text[i : i + size])
    out += read.end()
    content = "".join(p for p in out if isinstance(p, str)) or None
    calls: list[Call] = []
    for p in out:
        if isinstance(p, Call):
            if p.name is None:
                calls[-1] = Call(calls[-1].name, calls[-1].arguments + p.arguments)
            else:
                calls.append(p)
    return content, calls


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("Just text.", "Just text.", []),
        (WEATHER, None, [("get_weather", {"city": "Paris", "days": 2})]),
        (f"Let me look.\n{WEATHER}\n{CLOCK}\n", "Let me look.\n\n\n",
         [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]),
        ('<tool_call>{"name": "x", "parameters": {"a": 1}}</tool_call>', None, [("x", {"a": 1})]),
        ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
        ('text <tool_call>{"name": "cut", "argu', 'text <tool_call>{"name": "cut", "argu', []),
        ("a < b and <tool", "a < b and <tool", []),
        ("\n\n  ", None, []),
    ],
    ids=["plain", "one-call", "content-and-calls", "parameters-key", "bad-json", "no-name", "unclosed",
         "partial-tag", "whitespace"],
)
def test_hermes_whole_and_streamed(text: str, content: str | None, calls: list[tuple[str, dict]]) -> None:
    whole = read_all(HermesReader(), text)
    assert whole[0] == content
    assert [(c.name, json.loads(c.arguments)) for c in whole[1]] == calls
    for size in (1, 2, 3, 7, 1000):
        assert pieces_of(HermesReader(), text, size) == whole


def test_hermes_without_parallel_calls_keeps_the_first() -> None:
    content, calls = read_all(HermesReader(parallel=False), WEATHER + CLOCK)
    assert content is None and [c.name for c in calls] == ["get_weather"]


def test_arguments_keep_their_unicode() -> None:
    _, (call,) = read_all(HermesReader(), '<tool_call>{"name": "f", "arguments": {"q": "čaj ☕"}}</tool_call>')
    assert call.arguments == '{"q": "čaj ☕"}'


@pytest.mark.parametrize(
    ("text", "names", "content"),
    [
        ('[{"name":"a","arguments":{"x":"]}"}}]', ["a"], None),
        ('[{"name":"a","arguments":{}},{"name":"b","arguments":{"y":[1,{"z":2}]}}]', ["a", "b"], None),
        ('[{"name":"a","arguments":{"s":"\\"}"}},{"name":"b","argu', ["a"], None),  # cut: one whole call
        ('[{"name":"a","argu', [], '[{"name":"a","argu'),  # no call begun: the text as content
        ('[{"name":"a","arguments":{"x":"cu', ["a"], None),  # cut: the call, arguments cut
        ('[ {"name" : "a" , "arguments" : {"x":1} } ]', ["a"], None),  # free whitespace
        ('[{"arguments":{"x":1},"name":"a"}]', ["a"], None),  # another order: whole, when it closes
    ],
    ids=["string-with-brackets", "two-calls", "cut-after-one", "no-call-begun", "cut-in-arguments",
         "whitespace", "arguments-first"],
)
def test_the_required_array_whole_and_streamed(text: str, names: list[str], content: str | None) -> None:
    whole = read_all(ArrayReader(), text)
    assert [c.name for c in whole[1]] == names and whole[0] == content
    for size in (1, 4, 9, 1000):
        assert pieces_of(ArrayReader(), text, size) == whole


def test_the_required_array_streams_arguments_as_they_come() -> None:
    """A call is out once its name is read; its arguments follow piece by piece, raw."""
    read = ArrayReader()
    assert read.feed('[{"name":"get_weather","argu') == []
    assert read.feed('ments":{"ci') == [Call("get_weather", '{"ci')]
    assert read.feed('ty":"Oslo","n":[1,') == [Call(None, 'ty":"Oslo","n":[1,')]
    assert read.feed("2]}}") == [Call(None, "2]}")]  # the element's own brace is not theirs
    assert read.feed(',{"name":"b","arguments":{}}]') == [Call("b", "{}")]
    assert read.end() == []
    _, calls = read_all(ArrayReader(), '[{"name":"f","arguments":{"q":"čaj ☕","d":{"e":[]}}}]')
    assert calls == [Call("f", '{"q":"čaj ☕","d":{"e":[]}}')]


def test_the_named_function_streams_its_arguments_as_they_come() -> None:
    read = ArgumentsReader("get_weather")
    assert read.feed('{"ci') == [Call("get_weather", '{"ci')]
    assert read.feed('ty":"Oslo"}') == [Call(None, 'ty":"Oslo"}')]
    assert read.end() == []
    assert read_all(ArgumentsReader("f"), '{"a":1}') == (None, [Call("f", '{"a":1}')])
    assert read_all(ArgumentsReader("f"), "") == (None, [Call("f", "")])


def test_reader_per_mode() -> None:
    assert reader("none", None, True) is None
    assert isinstance(reader("auto", None, True), HermesReader)
    assert isinstance(reader("required", None, False), ArrayReader)
    assert isinstance(reader("named", "f", True), ArgumentsReader)
