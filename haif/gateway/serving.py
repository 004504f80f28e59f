"""Response shaping, in one place: worker outputs into OpenAI responses and stream chunks.

Every entry point (HTTP, the in-cluster SDK, P2P) gets its generations' bodies from here:
the choices, their logprobs (chat's ``logprobs.content``, the legacy completions shape), tool
calls read from the generated text (``haif.gateway.toolcalls``) and, streamed, OpenAI's
deltas, whose pieces join to what the whole answer gives. Embeddings are shaped by
``haif.protocol.embedding_response``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from haif.envelope import Shaping
from haif.gateway import toolcalls
from haif.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from haif.runtimes.base import StreamTally, usage_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from haif.protocol import FinishReason
    from haif.runtimes import base
    from haif.runtimes.base import GenerationOutput, StreamEvent

NO_SHAPING = Shaping()


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def chat_logprobs(entries: Sequence[base.TokenLogprob]) -> ChoiceLogprobs:
    """OpenAI's ``choices[].logprobs`` of chat: one entry per token, with its alternatives."""
    return ChoiceLogprobs(content=[
        TokenLogprob(
            token=e.token,
            logprob=e.logprob if e.logprob is not None else 0.0,
            bytes=list(e.raw),
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.raw)) for t in e.top],
        )
        for e in entries
    ])


def completion_logprobs(entries: Sequence[base.TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape; ``offset``: where the first token's text starts."""
    offsets: list[int] = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
        text_offset=offsets,
    )


def completion_response(
    model: str, outputs: list[GenerationOutput], response_id: str | None = None, n_choices: int = 1,
    shaping: Shaping = NO_SHAPING, fingerprint: str | None = None,
) -> CompletionResponse:
    """The /v1/completions body; its id is the job's id when the request has a job.

    ``outputs`` holds ``n_choices`` outputs per prompt, prompt by prompt: choice ``index``
    is prompt ``index // n`` 's choice ``index % n``, as OpenAI numbers them."""
    return CompletionResponse(
        id=response_id or new_id("cmpl"),
        created=now(),
        model=model,
        system_fingerprint=fingerprint,
        choices=[
            CompletionChoice(
                index=i, text=o.text, finish_reason=o.finish_reason,
                logprobs=completion_logprobs(o.logprobs) if shaping.logprobs else None,
            )
            for i, o in enumerate(outputs)
        ],
        usage=_usage(*usage_of(outputs, n_choices)),
    )


def _finish(reason: base.FinishReason, calls: int) -> FinishReason:
    return "tool_calls" if calls and reason == "stop" else reason


def chat_message(output: GenerationOutput, shaping: Shaping) -> tuple[ChatMessageOut, FinishReason]:
    """A choice's message (content, tool calls read from its text) and finish reason."""
    read = toolcalls.reader(shaping.tool_mode, shaping.tool_name, shaping.parallel_tool_calls)
    if read is None:
        return ChatMessageOut(content=output.text), output.finish_reason
    content, calls = toolcalls.read_all(read, output.text)
    tool_calls = [
        ToolCall(id=call_id(), function=FunctionCall(name=c.name or "", arguments=c.arguments)) for c in calls
    ]
    return ChatMessageOut(content=content, tool_calls=tool_calls or None), _finish(output.finish_reason, len(calls))


def chat_response(
    model: str, outputs: list[GenerationOutput], response_id: str | None = None, n_choices: int = 1,
    shaping: Shaping = NO_SHAPING, fingerprint: str | None = None,
) -> ChatCompletionResponse:
    """The /v1/chat/completions body: one prompt (the conversation), ``n_choices`` outputs."""
    if len(outputs) != n_choices:
        raise ValueError(f"a chat answer has {n_choices} choices; got {len(outputs)} outputs")
    choices: list[ChatChoice] = []
    for i, o in enumerate(outputs):
        message, finish = chat_message(o, shaping)
        logprobs = chat_logprobs(o.logprobs) if shaping.logprobs else None
        choices.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=logprobs))
    return ChatCompletionResponse(
        id=response_id or new_id("chatcmpl"),
        created=now(),
        model=model,
        system_fingerprint=fingerprint,
        choices=choices,
        usage=_usage(*usage_of(outputs, n_choices)),
    )


class _ChoiceStream:
    """One streamed choice: its tool-call reader, the logprobs not sent yet, its text offset."""

    def __init__(self, shaping: Shaping) -> None:
        self.reader = toolcalls.reader(shaping.tool_mode, shaping.tool_name, shaping.parallel_tool_calls)
        self.logprobs: list[base.TokenLogprob] = []
        self.offset = 0
        self.calls = 0
        self.call_ids: list[str] = []

    def delta(self, event: StreamEvent) -> ChatDelta | None:
        """The chat delta of ``event``: its content and tool-call pieces (None: nothing yet)."""
        if self.reader is None:
            return ChatDelta(content=event.text) if event.text else None
        pieces = self.reader.feed(event.text)
        if event.finish_reason is not None:
            pieces += self.reader.end()
        content = "".join(p for p in pieces if isinstance(p, str))
        calls: list[ToolCallDelta] = []
        for p in pieces:
            if not isinstance(p, toolcalls.Call):
                continue
            if p.name is None:  # more arguments of the last call
                calls.append(ToolCallDelta(index=len(self.call_ids) - 1,
                                           function=FunctionCallDelta(arguments=p.arguments)))
                continue
            self.call_ids.append(call_id())
            calls.append(ToolCallDelta(
                index=len(self.call_ids) - 1, id=self.call_ids[-1], type="function",
                function=FunctionCallDelta(name=p.name, arguments=p.arguments),
            ))
        if not content and not calls:
            return None
        return ChatDelta(content=content or None, tool_calls=calls or None)


class StreamFormatter:
    """Builds the chunks of one streamed response, OpenAI style."""

    def __init__(
        self, kind: str, model: str, include_usage: bool, response_id: str | None = None,
        n_choices: int = 1, shaping: Shaping = NO_SHAPING,
    ) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = response_id or new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        # "<model>:<version>" of the version serving it: set once the stream is dispatched.
        self.fingerprint: str | None = None
        self.n_choices = n_choices
        self.shaping = shaping
        self._choices: dict[int, _ChoiceStream] = {}
        self._tally = StreamTally(n_choices)
        self._started = False
        self._usage_sent = False

    @property
    def prompt_tokens(self) -> int:
        return self._tally.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Every choice's, so far."""
        return self._tally.completion_tokens

    @property
    def finished(self) -> bool:
        """Whether every choice has had its finish reason: the answer is whole."""
        return self._tally.finished

    def chunks(self, event: StreamEvent) -> list[ChatCompletionChunk | CompletionChunk]:
        """The chunks that ``event`` adds to the stream: the chat role chunk before the first
        text, the event's own chunk, and the usage chunk once the answer is whole (its usage
        leaves with its last text, not after the end of the stream)."""
        out: list[ChatCompletionChunk | CompletionChunk] = []
        if not self._started:
            self._started = True
            role = self.first()
            if role is not None:
                out.append(role)
        chunk = self.event(event)
        if chunk is not None:
            out.append(chunk)
        if self.finished:
            usage = self.usage_chunk()
            if usage is not None:
                out.append(usage)
        return out

    def first(self) -> ChatCompletionChunk | None:
        if self.kind != "chat":
            return None
        return ChatCompletionChunk(
            id=self.id,
            created=self.created, system_fingerprint=self.fingerprint,
            model=self.model,
            choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""), finish_reason=None)
                for i in range(self.n_choices)
            ],
        )

    def event(self, event: StreamEvent) -> ChatCompletionChunk | CompletionChunk | None:
        """The chunk ``event`` makes (None: nothing to say yet; its logprobs wait for the
        next chunk of the same choice)."""
        self._tally.add(event)
        choice = self._choices.get(event.index)
        if choice is None:
            choice = self._choices[event.index] = _ChoiceStream(self.shaping)
        if self.shaping.logprobs:
            choice.logprobs.extend(event.logprobs)
        if self.kind == "chat":
            delta = choice.delta(event)
            if delta is None and event.finish_reason is None:
                return None
            finish = None
            if event.finish_reason is not None:
                finish = _finish(event.finish_reason, len(choice.call_ids))
            logprobs = self._take_logprobs(choice, chat=True)
            return self._chat(event.index, delta or ChatDelta(), finish, logprobs)
        if not event.text and event.finish_reason is None:
            return None
        logprobs = self._take_logprobs(choice, chat=False)
        return CompletionChunk(
            id=self.id,
            created=self.created, system_fingerprint=self.fingerprint,
            model=self.model,
            choices=[CompletionChoice(index=event.index, text=event.text, finish_reason=event.finish_reason,
                                      logprobs=logprobs)],
        )

    def _take_logprobs(self, choice: _ChoiceStream, *, chat: bool) -> Any:
        if not self.shaping.logprobs:
            return None
        entries, choice.logprobs = choice.logprobs, []
        if chat:
            return chat_logprobs(entries)
        shaped = completion_logprobs(entries, choice.offset)
        choice.offset += sum(len(e.token) for e in entries)
        return shaped

    def usage_chunk(self) -> ChatCompletionChunk | CompletionChunk | None:
        """The usage chunk, once (None when not asked for, or already sent)."""
        if not self.include_usage or self._usage_sent:
            return None
        self._usage_sent = True
        usage = _usage(self.prompt_tokens, self.completion_tokens)
        if self.kind == "chat":
            return ChatCompletionChunk(
                id=self.id, created=self.created, system_fingerprint=self.fingerprint, model=self.model,
                choices=[], usage=usage,
            )
        return CompletionChunk(
            id=self.id, created=self.created, system_fingerprint=self.fingerprint, model=self.model,
            choices=[], usage=usage,
        )

    def _chat(self, index: int, delta: ChatDelta, finish: Any, logprobs: Any = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created, system_fingerprint=self.fingerprint,
            model=self.model,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)],
        )

