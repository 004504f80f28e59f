"""What a worker hands its runtime for a generation request: the sampling parameters
(every OpenAI and vLLM sampling field, the grammar a ``response_format`` or forced tool
call asks for) and the prompts (a chat's messages and tools through the chat template)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from haif.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
)
from haif.runtimes import tools
from haif.runtimes.base import ChatMessage, Guide, SamplingParams

if TYPE_CHECKING:
    from haif.runtimes.base import Prompt, Runtime


def generation(
    runtime: Runtime, body: CompletionRequest | ChatCompletionRequest, max_tokens: int
) -> tuple[list[Prompt], SamplingParams]:
    """The prompts and parameters of a generation.

    Raises:
        UnsupportedParameter: the runtime cannot honour something the request asks for.
    """
    params = sampling_params(body, max_tokens)
    if isinstance(body, CompletionRequest):
        prompts: list[Prompt] = list(body.prompts())
    else:
        prompts = [runtime.render_chat(chat_messages(body), tools.rendered(body.tools))]
    runtime.check_request(params, prompts)
    return prompts, params


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    """The request's sampling parameters, as every runtime reads them."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        top_k=max(body.top_k or 0, 0),  # -1 and 0: off
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=tuple(sorted(body.logit_bias_ids().items())),
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs_count(),
        echo=isinstance(body, CompletionRequest) and body.echo,
        guide=guide(body),
    )


def guide(body: CompletionRequest | ChatCompletionRequest) -> Guide | None:
    """The grammar the answer must follow: its ``response_format``, or the tool call its
    ``tool_choice`` forces."""
    if not isinstance(body, ChatCompletionRequest):
        return None
    mode, name = body.tool_mode()
    if mode in ("required", "named"):
        return tools.tool_guide(body.tools or [], mode, name, body.parallel_tool_calls)
    fmt = body.response_format
    if isinstance(fmt, ResponseFormatJsonObject):
        return Guide("json_object")
    if isinstance(fmt, ResponseFormatJsonSchema):
        return Guide("json_schema", tools.canonical(fmt.json_schema.schema_ or {}))
    return None


def chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    """The conversation, with assistants' tool calls and tools' answers, for the template."""
    return [
        ChatMessage(
            role=m.role, content=m.text(), name=m.name,
            tool_calls=m.tool_calls_json() or None, tool_call_id=m.tool_call_id,
        )
        for m in body.messages
    ]
