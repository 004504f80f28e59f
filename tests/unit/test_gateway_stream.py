"""The Gateway's stream pipeline: the answer's usage leaves with its last text, not once the
end of the stream has come back from the worker; a consumer that stops after the last
chunk is billed for the whole answer; a stream that fails before it is settled as failed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from haif.config import HaifConfig, ModelConfig
from haif.envelope import Dispatched, RequestContext, build_work_item
from haif.exceptions import WorkerUnavailable
from haif.gateway.admission import Ticket
from haif.gateway.compose import GatewayParts
from haif.gateway.pipeline import Pipeline
from haif.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions
from haif.runtimes.base import GenerationOutput, StreamEvent

pytestmark = pytest.mark.unit

CONFIG = HaifConfig(models=[ModelConfig(name="echo", runtime="echo", device="cpu")])


class Admission:
    """Records how the Gateway settles the request."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, int]] = []

    async def admit(self, item: Any) -> Ticket:
        return Ticket(item=item, job_id="cmpl-job1")

    async def succeed(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, *_: Any) -> None:
        self.settled.append(("succeeded", prompt_tokens, completion_tokens))

    async def fail(self, ticket: Ticket, exc: BaseException, prompt_tokens: int, completion_tokens: int) -> None:
        self.settled.append((type(exc).__name__, prompt_tokens, completion_tokens))


class Router:
    """``Router.stream`` as the pipeline sees it: the events, then an end that comes only
    when ``end`` is set (or ``error`` is raised instead)."""

    version = "v1"

    def __init__(self, events: list[StreamEvent], error: Exception | None = None) -> None:
        self.events = events
        self.error = error
        self.end = asyncio.Event()

    async def stream(self, item: Any) -> Any:
        yield Dispatched("w-1", "local", 1, self.events[0])
        for event in self.events[1:]:
            yield event
        if self.error is not None:
            raise self.error
        await self.end.wait()


def gateway(router: Router) -> tuple[Pipeline, Admission]:
    """A pipeline built as a test builds one: its collaborators passed in."""
    admission = Admission()
    return Pipeline(CONFIG, GatewayParts(admission=admission, router=router)), admission  # type: ignore[arg-type]


def item(include_usage: bool, n: int = 1) -> Any:
    body = CompletionRequest(
        model="echo", prompt="a b c", max_tokens=8, stream=True, n=n,
        stream_options=StreamOptions(include_usage=True) if include_usage else None,
    )
    return build_work_item("completion", body, RequestContext.new(timeout_s=30, api_key="k"), CONFIG.limits)


EVENTS = [StreamEvent("a", 1, 3), StreamEvent(" b", 2, 3, "stop")]


async def test_usage_leaves_with_the_last_text_and_the_answer_is_billed_in_full() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        router = Router(EVENTS)
        gw, admission = gateway(router)
        stream = gw.stream(item(include_usage=True))
        # The end of the stream never comes back: all three chunks must still arrive.
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(3)]
        assert admission.settled == []  # settled once the stream is over
        await stream.aclose()  # a consumer that stops at the last chunk
        return chunks, admission.settled

    chunks, settled = await run()
    assert [c.choices[0].text for c in chunks[:2]] == ["a", " b"]
    assert chunks[1].choices[0].finish_reason == "stop"
    assert chunks[2].choices == [] and chunks[2].usage.completion_tokens == 2
    assert chunks[2].id == "cmpl-job1"
    assert settled == [("succeeded", 3, 2)]


async def test_a_consumer_that_stops_at_the_finish_reason_without_usage_is_billed_in_full() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Router(EVENTS))
        stream = gw.stream(item(include_usage=False))
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        await stream.aclose()
        return chunks, admission.settled

    chunks, settled = await run()
    assert chunks[1].choices[0].finish_reason == "stop"
    assert settled == [("succeeded", 3, 2)]


async def test_a_consumer_that_stops_before_the_last_text_is_billed_for_what_it_got() -> None:
    async def run() -> list[tuple[str, int, int]]:
        gw, admission = gateway(Router(EVENTS))
        stream = gw.stream(item(include_usage=True))
        await asyncio.wait_for(anext(stream), 5)
        await stream.aclose()
        return admission.settled

    assert await run() == [("GeneratorExit", 3, 1)]


async def test_a_stream_read_to_its_end_is_settled_once_as_a_success() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        router = Router(EVENTS)
        router.end.set()
        gw, admission = gateway(router)
        return [c async for c in gw.stream(item(include_usage=False))], admission.settled

    chunks, settled = await run()
    assert [c.choices[0].text for c in chunks] == ["a", " b"]  # no usage chunk: not asked for
    assert settled == [("succeeded", 3, 2)]


async def test_an_error_after_the_last_text_does_not_fail_the_answer() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Router(EVENTS, WorkerUnavailable("gone after the answer")))
        return [c async for c in gw.stream(item(include_usage=True))], admission.settled

    chunks, settled = await run()
    assert len(chunks) == 3 and chunks[2].usage is not None
    assert settled == [("succeeded", 3, 2)]


async def test_a_stream_that_fails_before_its_last_text_is_settled_as_failed() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Router(EVENTS[:1], WorkerUnavailable("worker died")))
        chunks: list[Any] = []
        with pytest.raises(WorkerUnavailable):
            async for c in gw.stream(item(include_usage=True)):
                chunks.append(c)
        return chunks, admission.settled

    chunks, settled = await run()
    assert [c.choices[0].text for c in chunks] == ["a"]  # no usage chunk after a failure
    assert settled == [("WorkerUnavailable", 3, 1)]


async def test_with_several_choices_usage_and_success_wait_for_the_last_choice() -> None:
    events = [
        StreamEvent("a", 1, 3, index=1),
        StreamEvent("x", 1, 3, "stop", index=0),
        StreamEvent(" b", 2, 3, index=1),
        StreamEvent(" c", 3, 3, "length", index=1),
    ]

    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Router(events))
        stream = gw.stream(item(include_usage=True, n=2))
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(5)]
        await stream.aclose()  # stops at the usage chunk; the end never came back
        return chunks, admission.settled

    chunks, settled = await run()
    assert [(c.choices[0].index, c.choices[0].text) for c in chunks[:4]] == [(1, "a"), (0, "x"), (1, " b"), (1, " c")]
    # The prompt counts once; each choice's completion tokens count.
    assert chunks[4].choices == [] and chunks[4].usage.prompt_tokens == 3
    assert chunks[4].usage.completion_tokens == 1 + 3
    assert settled == [("succeeded", 3, 4)]


async def test_with_several_choices_a_consumer_gone_after_the_first_finish_is_billed_for_what_it_got() -> None:
    events = [StreamEvent("x", 1, 3, "stop", index=0), StreamEvent("a", 1, 3, index=1)]

    async def run() -> list[tuple[str, int, int]]:
        gw, admission = gateway(Router(events))
        stream = gw.stream(item(include_usage=True, n=2))
        await asyncio.wait_for(anext(stream), 5)  # choice 0's whole answer, choice 1 still open
        await stream.aclose()
        return admission.settled

    assert await run() == [("GeneratorExit", 3, 1)]


TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
CALL = ['<tool_call>{"name": "get_time", "argu', 'ments": {}}</tool_call>']


def chat_item(stream: bool) -> Any:
    body = ChatCompletionRequest.model_validate({
        "model": "echo", "messages": [{"role": "user", "content": "time?"}], "tools": TOOLS, "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    })
    return build_work_item("chat", body, RequestContext.new(timeout_s=30, api_key="k"), CONFIG.limits)


async def test_a_chat_with_tools_is_answered_with_tool_calls_plain_and_streamed() -> None:
    class Unary(Router):
        async def call(self, item: Any, method: str) -> Dispatched:
            return Dispatched("w-1", "local", 1, [GenerationOutput("".join(CALL), 3, 9, "stop")])

    async def run() -> tuple[Any, list[Any]]:
        router = Unary([StreamEvent(CALL[0], 4, 3), StreamEvent(CALL[1], 9, 3, "stop")])
        router.end.set()
        gw, _ = gateway(router)
        plain = await gw.generate(chat_item(stream=False))
        return plain, [c async for c in gw.stream(chat_item(stream=True))]

    plain, chunks = await run()
    (call,) = plain.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_time", "{}")
    assert plain.choices[0].finish_reason == "tool_calls" and plain.choices[0].message.content is None
    assert chunks[0].choices[0].delta.role == "assistant"
    (delta,) = chunks[1].choices[0].delta.tool_calls  # the call once it is whole
    assert (delta.index, delta.function.name, delta.function.arguments) == (0, "get_time", "{}")
    assert chunks[1].choices[0].finish_reason == "tool_calls"
    assert chunks[2].usage.completion_tokens == 9


async def test_a_forced_call_streams_its_arguments_as_they_come() -> None:
    """``tool_choice: required``: the call's id and name in its first delta, then its
    arguments piece by piece at the same index, as OpenAI streams them."""
    pieces = ['[{"name":"get_time","arguments":{"z', 'one":"U', 'TC"}}]']
    body = ChatCompletionRequest.model_validate({
        "model": "echo", "messages": [{"role": "user", "content": "time?"}], "tools": TOOLS,
        "tool_choice": "required", "stream": True,
    })
    item = build_work_item("chat", body, RequestContext.new(timeout_s=30, api_key="k"), CONFIG.limits)

    async def run() -> list[Any]:
        router = Router([StreamEvent(p, i + 1, 3, "stop" if i == 2 else None) for i, p in enumerate(pieces)])
        router.end.set()
        gw, _ = gateway(router)
        return [c async for c in gw.stream(item)]

    deltas = [d for c in await run() for ch in c.choices for d in ch.delta.tool_calls or ()]
    assert [(d.index, d.id is not None, d.function.name) for d in deltas] == [
        (0, True, "get_time"), (0, False, None), (0, False, None)
    ]
    assert "".join(d.function.arguments for d in deltas) == '{"zone":"UTC"}'
    assert [d.function.arguments for d in deltas] == ['{"z', 'one":"U', 'TC"}']
