"""coalesce(): how a worker groups a stream's tokens into the pieces that cross the hops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from haif.config import ModelConfig
from haif.runtimes.base import StreamEvent
from haif.runtimes.streams import coalesce

pytestmark = pytest.mark.unit

WORDS = [f"w{i} " for i in range(10)]


async def tokens(
    delay_s: float, words: list[str] = WORDS, fail_after: int | None = None, closed: list | None = None
) -> AsyncIterator[StreamEvent]:
    try:
        for i, word in enumerate(words):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("engine broke")
            await asyncio.sleep(delay_s)
            yield StreamEvent(word, i + 1, 3, "stop" if i == len(words) - 1 else None)
    finally:
        if closed is not None:
            closed.append(True)


async def collect(pieces: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [p async for p in pieces]


async def test_without_an_interval_a_prompt_consumer_sees_every_token() -> None:
    pieces = await collect(coalesce(tokens(0.002)))
    assert [p.text for p in pieces] == WORDS
    assert pieces[-1].completion_tokens == 10 and pieces[-1].finish_reason == "stop"


async def test_with_an_interval_the_first_token_goes_alone_and_the_rest_travel_together() -> None:
    async def run() -> tuple[list[StreamEvent], float, float]:
        start = time.monotonic()
        first_at = None
        out = []
        async for piece in coalesce(tokens(0.005), 2.0):
            first_at = first_at if first_at is not None else time.monotonic() - start
            out.append(piece)
        return out, first_at, time.monotonic() - start

    pieces, first_at, total = await run()
    assert pieces[0].text == WORDS[0] and first_at < 1.0  # the first token never waits
    assert "".join(p.text for p in pieces) == "".join(WORDS)  # nothing lost, nothing reordered
    assert len(pieces) == 2  # everything after the first arrived within the 2 s interval
    assert pieces[-1] == StreamEvent("".join(WORDS[1:]), 10, 3, "stop")
    assert total < 1.5  # the stream's end did not wait the interval out


async def test_pieces_are_spaced_by_the_interval() -> None:
    async def run() -> list[float]:
        stamps = []
        async for _ in coalesce(tokens(0.01, [f"t{i}" for i in range(40)]), 0.1):
            stamps.append(time.monotonic())
        return stamps

    stamps = await run()
    gaps = [b - a for a, b in zip(stamps, stamps[1:-1], strict=False)]  # the last piece may go early
    assert 2 <= len(stamps) <= 8  # ~0.4 s of tokens in pieces 0.1 s apart, not 40 pieces
    assert all(g >= 0.095 for g in gaps), gaps


async def test_the_interval_is_read_for_every_piece() -> None:
    asked = []

    def interval() -> float:
        asked.append(True)
        return 0.0

    pieces = await collect(coalesce(tokens(0.002), interval))
    assert [p.text for p in pieces] == WORDS and len(asked) == len(WORDS)


async def test_an_error_arrives_after_the_text_made_before_it() -> None:
    async def run() -> tuple[list[str], BaseException | None]:
        texts = []
        try:
            async for piece in coalesce(tokens(0.002, fail_after=4), 5.0):
                texts.append(piece.text)
        except RuntimeError as exc:
            return texts, exc
        return texts, None

    texts, error = await run()
    assert str(error) == "engine broke"
    assert "".join(texts) == "".join(WORDS[:4])  # held text is delivered, not dropped


async def test_closing_the_pieces_closes_the_runtime_stream() -> None:
    closed: list = []

    async def run() -> None:
        pieces = coalesce(tokens(0.01, closed=closed), 0.05)
        await pieces.__anext__()
        await pieces.aclose()
        await asyncio.sleep(0)

    await run()
    assert closed == [True]  # the runtime frees the request's batch slot at once


@pytest.mark.parametrize("field", ["stream_batch_ms", "stream_pieces_per_s"])
def test_stream_pacing_is_bounded_in_the_config(field: str) -> None:
    assert getattr(ModelConfig(name="m", runtime="echo", **{field: 0}), field) == 0
    with pytest.raises(ValueError, match=field):
        ModelConfig(name="m", runtime="echo", **{field: -1})


def _worker(device: str, streams: int, **model: object):  # noqa: ANN202
    from actors.worker import ModelWorker

    worker = ModelWorker.__new__(ModelWorker)  # the pacing arithmetic alone: no Ray
    worker.model = ModelConfig(name="m", runtime="echo", **model)
    worker._device, worker._streams = device, streams
    return worker


def test_a_cpu_worker_shares_a_piece_budget_and_a_gpu_worker_has_none_by_default() -> None:
    from actors.worker import MAX_PIECE_INTERVAL_S
    from haif.config import CPU_STREAM_PIECES_PER_S, STREAM_BATCH_MS

    assert _worker("cpu", 1)._piece_interval_s() == STREAM_BATCH_MS / 1000  # one stream: its own pace
    assert _worker("cpu", 32)._piece_interval_s() == pytest.approx(32 / CPU_STREAM_PIECES_PER_S)
    assert _worker("cpu", 10_000)._piece_interval_s() == MAX_PIECE_INTERVAL_S  # never slower than that
    assert _worker("cuda", 32)._piece_interval_s() == STREAM_BATCH_MS / 1000
    # Set explicitly, the model's own value holds on either device (0: no bound).
    assert _worker("cpu", 32, stream_pieces_per_s=0)._piece_interval_s() == STREAM_BATCH_MS / 1000
    assert _worker("cuda", 32, stream_pieces_per_s=64)._piece_interval_s() == pytest.approx(0.5)
