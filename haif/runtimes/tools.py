"""Tool calling, the generation side: what the model is asked to write, and the grammar
that makes it write it when ``tool_choice`` forces a call.

The tools are rendered by the model's chat template (whatever ``tool_choice``, as vLLM
does). Three ways a chat answer may call them (``ChatCompletionRequest.tool_mode``):

``auto``      the model decides; a call is written in the hermes markup, ``<tool_call>{"name":
              ..., "arguments": {...}}</tool_call>`` (vLLM's ``hermes`` parser reads the same).
``required``  the output is constrained to a JSON array of one or more calls (one, without
              ``parallel_tool_calls``): ``[{"name": ..., "arguments": {...}}, ...]``, each
              call's arguments valid against its function's parameters.
``named``     the output is constrained to the named function's arguments (a JSON object).

``haif.gateway.toolcalls`` reads the answer back into OpenAI's ``tool_calls``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from haif.runtimes.base import Guide

if TYPE_CHECKING:
    from haif.protocol import ChatTool, ToolMode

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


def canonical(schema: Any) -> str:
    """A schema's JSON text, compact: the same schema, the same grammar-cache key. Keys keep
    their order: properties are generated in the order the schema gives them."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or NO_ARGUMENTS


def calls_schema(tools: Sequence[ChatTool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a ``required`` answer: an array of calls of the given tools."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_guide(tools: Sequence[ChatTool], mode: ToolMode, name: str | None, parallel: bool) -> Guide | None:
    """The grammar a forced tool call follows (None for ``auto`` and ``none``)."""
    if mode == "required":
        return Guide("json_schema", canonical(calls_schema(tools, parallel)), param="tool_choice")
    if mode == "named":
        (tool,) = [t for t in tools if t.function.name == name]
        return Guide("json_schema", canonical(parameters(tool)), param=f"tools ({name}.parameters)")
    return None


def rendered(tools: Sequence[ChatTool] | None) -> list[dict[str, Any]] | None:
    """The tools as the chat template gets them (OpenAI's shape). With ``tool_choice: none``
    too, as vLLM renders them: the conversation may hold calls of them; the answer is read
    as content only."""
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) for t in tools]
