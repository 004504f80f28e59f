"""The Gateway's stream: the answer's usage leaves with its last text, not once the end
of the stream has come back from the worker; a consumer that stops after the last
chunk is billed for the whole answer; a stream that fails before it is settled as failed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from haif.config import HaifConfig, ModelConfig
from haif.envelope import Dispatched, RequestContext, build_work_item
from haif.exceptions import WorkerUnavailable
from haif.gateway.admission import Ticket
from haif.gateway.deployment import Gateway
from haif.protocol import CompletionRequest, StreamOptions
from haif.runtimes.base import StreamEvent

pytestmark = pytest.mark.unit

CONFIG = HaifConfig(models=[ModelConfig(name="echo", runtime="echo", device="cpu")])


class Admission:
    """Records how the Gateway settles the request."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, int]] = []

    async def admit(self, item: Any) -> Ticket:
        return Ticket(item=item, job_id="cmpl-job1")

    async def succeed(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> None:
        self.settled.append(("succeeded", prompt_tokens, completion_tokens))

    async def fail(self, ticket: Ticket, exc: BaseException, prompt_tokens: int, completion_tokens: int) -> None:
        self.settled.append((type(exc).__name__, prompt_tokens, completion_tokens))


class Orchestrator:
    """``Orchestrator.stream`` as the Gateway's handle sees it: the events, then an end
    that comes only when ``end`` is set (or ``error`` is raised instead)."""

    def __init__(self, events: list[StreamEvent], error: Exception | None = None) -> None:
        self.events = events
        self.error = error
        self.end = asyncio.Event()
        self.stream = self

    def remote(self, item: Any) -> Any:
        return self._run()

    async def _run(self) -> Any:
        yield Dispatched("w-1", "local", 1, self.events[0])
        for event in self.events[1:]:
            yield event
        if self.error is not None:
            raise self.error
        await self.end.wait()


class StreamOnly(Gateway):
    """The Gateway without its Serve constructor (which opens databases) and shutdown."""

    def __del__(self) -> None:
        pass


def gateway(orchestrator: Orchestrator) -> tuple[Gateway, Admission]:
    gw = StreamOnly.__new__(StreamOnly)
    admission = Admission()
    gw._config, gw._background, gw._tasks = CONFIG, [], []  # noqa: SLF001
    gw._admission, gw._stream_handle = admission, orchestrator  # noqa: SLF001
    return gw, admission


def item(include_usage: bool, n: int = 1) -> Any:
    body = CompletionRequest(
        model="echo", prompt="a b c", max_tokens=8, stream=True, n=n,
        stream_options=StreamOptions(include_usage=True) if include_usage else None,
    )
    return build_work_item("completion", body, RequestContext.new(timeout_s=30, api_key="k"), CONFIG.limits)


EVENTS = [StreamEvent("a", 1, 3), StreamEvent(" b", 2, 3, "stop")]


def test_usage_leaves_with_the_last_text_and_the_answer_is_billed_in_full() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        orchestrator = Orchestrator(EVENTS)
        gw, admission = gateway(orchestrator)
        stream = gw.stream(item(include_usage=True))
        # The end of the stream never comes back: all three chunks must still arrive.
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(3)]
        assert admission.settled == []  # settled once the stream is over
        await stream.aclose()  # a consumer that stops at the last chunk
        return chunks, admission.settled

    chunks, settled = asyncio.run(run())
    assert [c.choices[0].text for c in chunks[:2]] == ["a", " b"]
    assert chunks[1].choices[0].finish_reason == "stop"
    assert chunks[2].choices == [] and chunks[2].usage.completion_tokens == 2
    assert chunks[2].id == "cmpl-job1"
    assert settled == [("succeeded", 3, 2)]


def test_a_consumer_that_stops_at_the_finish_reason_without_usage_is_billed_in_full() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Orchestrator(EVENTS))
        stream = gw.stream(item(include_usage=False))
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        await stream.aclose()
        return chunks, admission.settled

    chunks, settled = asyncio.run(run())
    assert chunks[1].choices[0].finish_reason == "stop"
    assert settled == [("succeeded", 3, 2)]


def test_a_consumer_that_stops_before_the_last_text_is_billed_for_what_it_got() -> None:
    async def run() -> list[tuple[str, int, int]]:
        gw, admission = gateway(Orchestrator(EVENTS))
        stream = gw.stream(item(include_usage=True))
        await asyncio.wait_for(anext(stream), 5)
        await stream.aclose()
        return admission.settled

    assert asyncio.run(run()) == [("GeneratorExit", 3, 1)]


def test_a_stream_read_to_its_end_is_settled_once_as_a_success() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        orchestrator = Orchestrator(EVENTS)
        orchestrator.end.set()
        gw, admission = gateway(orchestrator)
        return [c async for c in gw.stream(item(include_usage=False))], admission.settled

    chunks, settled = asyncio.run(run())
    assert [c.choices[0].text for c in chunks] == ["a", " b"]  # no usage chunk: not asked for
    assert settled == [("succeeded", 3, 2)]


def test_an_error_after_the_last_text_does_not_fail_the_answer() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Orchestrator(EVENTS, WorkerUnavailable("gone after the answer")))
        return [c async for c in gw.stream(item(include_usage=True))], admission.settled

    chunks, settled = asyncio.run(run())
    assert len(chunks) == 3 and chunks[2].usage is not None
    assert settled == [("succeeded", 3, 2)]


def test_a_stream_that_fails_before_its_last_text_is_settled_as_failed() -> None:
    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Orchestrator(EVENTS[:1], WorkerUnavailable("worker died")))
        chunks: list[Any] = []
        with pytest.raises(WorkerUnavailable):
            async for c in gw.stream(item(include_usage=True)):
                chunks.append(c)
        return chunks, admission.settled

    chunks, settled = asyncio.run(run())
    assert [c.choices[0].text for c in chunks] == ["a"]  # no usage chunk after a failure
    assert settled == [("WorkerUnavailable", 3, 1)]


def test_with_several_choices_usage_and_success_wait_for_the_last_choice() -> None:
    events = [
        StreamEvent("a", 1, 3, index=1),
        StreamEvent("x", 1, 3, "stop", index=0),
        StreamEvent(" b", 2, 3, index=1),
        StreamEvent(" c", 3, 3, "length", index=1),
    ]

    async def run() -> tuple[list[Any], list[tuple[str, int, int]]]:
        gw, admission = gateway(Orchestrator(events))
        stream = gw.stream(item(include_usage=True, n=2))
        chunks = [await asyncio.wait_for(anext(stream), 5) for _ in range(5)]
        await stream.aclose()  # stops at the usage chunk; the end never came back
        return chunks, admission.settled

    chunks, settled = asyncio.run(run())
    assert [(c.choices[0].index, c.choices[0].text) for c in chunks[:4]] == [(1, "a"), (0, "x"), (1, " b"), (1, " c")]
    # The prompt counts once; each choice's completion tokens count.
    assert chunks[4].choices == [] and chunks[4].usage.prompt_tokens == 3
    assert chunks[4].usage.completion_tokens == 1 + 3
    assert settled == [("succeeded", 3, 4)]


def test_with_several_choices_a_consumer_gone_after_the_first_finish_is_billed_for_what_it_got() -> None:
    events = [StreamEvent("x", 1, 3, "stop", index=0), StreamEvent("a", 1, 3, index=1)]

    async def run() -> list[tuple[str, int, int]]:
        gw, admission = gateway(Orchestrator(events))
        stream = gw.stream(item(include_usage=True, n=2))
        await asyncio.wait_for(anext(stream), 5)  # choice 0's whole answer, choice 1 still open
        await stream.aclose()
        return admission.settled

    assert asyncio.run(run()) == [("GeneratorExit", 3, 1)]
