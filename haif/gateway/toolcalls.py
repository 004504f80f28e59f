"""Tool calls read back from generated text, whole or as it streams (the formats are those of
``haif.runtimes.tools``).

Each reader turns text into pieces: content, or a complete call (its name and its arguments
as JSON text). A streamed answer goes through the same reader piece by piece, so that its
deltas join to exactly what the whole answer gives:

- ``HermesReader`` (``auto``): ``<tool_call>{"name", "arguments"}</tool_call>`` blocks are
  calls; everything else is content (whitespace-only content is no content). A block that
  does not parse, or never closes, stays content.
- ``ArrayReader`` (``required``): each element of the JSON array is a call as soon as its
  name is read, its arguments passed on as they come (as vLLM streams them). An answer
  cut by ``max_tokens`` keeps the call it was writing, arguments cut (as OpenAI's do);
  one with no call begun is given as content.
- Calls in ``auto`` are passed on whole, when their block closes: until it parses, a
  block the model writes may turn out to be content.
- ``ArgumentsReader`` (``named``): the text is the named function's arguments, passed on as
  it comes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from haif.runtimes.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

if TYPE_CHECKING:
    from haif.protocol import ToolMode


@dataclass(frozen=True)
class Call:
    """A call, or (streaming ``named``) a piece of one: ``name`` None continues the last."""

    name: str | None
    arguments: str


Piece = str | Call  # content, or a call

# The start of a forced call, up to its arguments: ``{"name":"...","arguments":``.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def _call(value: Any) -> Call | None:
    """The call a parsed JSON object describes, or None if it does not describe one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return Call(value["name"], text)


class _Content:
    """Content as the whole answer would give it: whitespace held until something else comes."""

    def __init__(self) -> None:
        self._held = ""
        self.seen = False  # some non-whitespace content has been passed on

    def add(self, text: str) -> list[Piece]:
        if not text:
            return []
        if not text.strip():
            self._held += text
            return []
        out, self._held = self._held + text, ""
        self.seen = True
        return [out]

    def end(self) -> list[Piece]:
        out, self._held = self._held, ""
        return [out] if self.seen and out else []


class HermesReader:
    """``auto``: hermes ``<tool_call>`` blocks among content."""

    def __init__(self, parallel: bool = True) -> None:
        self._buffer = ""
        self._inside = False
        self._content = _Content()
        self._parallel = parallel
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        out: list[Piece] = []
        while True:
            if not self._inside:
                at = self._buffer.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                    cut = len(self._buffer) - keep
                    out += self._content.add(self._buffer[:cut])
                    self._buffer = self._buffer[cut:]
                    return out
                out += self._content.add(self._buffer[:at])
                self._buffer = self._buffer[at + len(TOOL_CALL_OPEN) :]
                self._inside = True
            at = self._buffer.find(TOOL_CALL_CLOSE)
            if at < 0:
                return out
            body, self._buffer = self._buffer[:at], self._buffer[at + len(TOOL_CALL_CLOSE) :]
            self._inside = False
            try:
                call = _call(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                out += self._content.add(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
            elif self._parallel or not self.calls:
                self.calls += 1
                out.append(call)

    def end(self) -> list[Piece]:
        rest = (TOOL_CALL_OPEN if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        return self._content.add(rest) + self._content.end()


class ArrayReader:
    """``required``: a JSON array of calls. A call is passed on once its name is read, and its
    arguments (a JSON object, as the grammar writes them) as they come; an element of
    another form is passed on whole when it closes, if it describes a call."""

    def __init__(self) -> None:
        self._text = ""
        self._start: int | None = None  # where the element being read starts
        self._depth = 0
        self._string = False
        self._escaped = False
        self._name: str | None = None  # the open call's, until its first piece is out
        self._args: int | None = None  # where the open call's arguments not passed on start
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        base = len(self._text)
        self._text += text
        for offset, char in enumerate(text):
            at = base + offset
            if self._string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._string = False
                continue
            if char == '"':
                self._string = True
            elif char in "[{":
                self._depth += 1
                if self._depth == 2 and char == "{":
                    self._start = at
                elif self._depth == 3 and char == "{" and self._start is not None and self._args is None:
                    self._open(at)
            elif char in "]}":
                self._depth -= 1
                if self._depth == 2 and char == "}" and self._args is not None:
                    out += self._arguments(at + 1)  # the arguments are whole
                    self._args = -1  # the rest of the element is not theirs
                elif self._depth == 1 and char == "}" and self._start is not None:
                    out += self._close(at)
        if self._args is not None and self._args >= 0:
            out += self._arguments(len(self._text))
        return out

    def _open(self, at: int) -> None:
        """The element's arguments start at ``at``: a call, if its name came before them."""
        head = _CALL_HEAD.fullmatch(self._text, self._start or 0, at)
        if head is None:
            return
        self._name, self._args = json.loads(head.group(1)), at
        self.calls += 1

    def _arguments(self, end: int) -> list[Piece]:
        """The open call's arguments up to ``end`` not passed on yet (with its name, first)."""
        assert self._args is not None
        text, self._args = self._text[self._args : end], end
        if self._name is not None:
            name, self._name = self._name, None
            return [Call(name, text)]
        return [Call(None, text)] if text else []

    def _close(self, at: int) -> list[Piece]:
        start, opened = self._start, self._args is not None
        self._start, self._args = None, None
        if opened or start is None:
            return []
        try:
            call = _call(json.loads(self._text[start : at + 1]))
        except ValueError:
            return []
        if call is None:
            return []
        self.calls += 1
        return [call]

    def end(self) -> list[Piece]:
        return [self._text] if not self.calls and self._text else []


class ArgumentsReader:
    """``named``: the whole text is the arguments of the one call."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        if not text and self.calls:
            return []
        first, self.calls = not self.calls, 1
        return [Call(self._name if first else None, text)]

    def end(self) -> list[Piece]:
        return [] if self.calls else [Call(self._name, "")]


Reader = HermesReader | ArrayReader | ArgumentsReader


def reader(mode: ToolMode, name: str | None, parallel: bool) -> Reader | None:
    """The reader of an answer whose tool calls come this way (None: no tools, all content)."""
    if mode == "auto":
        return HermesReader(parallel)
    if mode == "required":
        return ArrayReader()
    if mode == "named":
        return ArgumentsReader(name or "")
    return None


def read_all(read: Reader, text: str) -> tuple[str | None, list[Call]]:
    """The whole answer's content (None when it has none) and calls."""
    pieces = read.feed(text) + read.end()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls: list[Call] = []
    for p in pieces:
        if isinstance(p, Call):
            if p.name is None and calls:  # a continuation of the last call's arguments
                calls[-1] = Call(calls[-1].name, calls[-1].arguments + p.arguments)
            else:
                calls.append(p)
    return (content or None), calls


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that could be the start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
