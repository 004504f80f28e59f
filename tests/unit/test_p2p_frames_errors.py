"""The sidecar link's frames, and the mapping of HAIF errors to P2P codes and back."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest

from haif import exceptions as exc
from haif.p2p._frames import FrameError, encode_frame, read_frame
from haif.p2p.errors import from_rpc_error, rpc_code, to_rpc_error

pytestmark = pytest.mark.unit


async def read(data: bytes, max_bytes: int = 1024) -> list[Any]:
    async def go() -> list[Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frames = []
        while (frame := await read_frame(reader, max_bytes)) is not None:
            frames.append(frame)
        return frames

    return await go()


async def test_frames_round_trip_in_one_stream() -> None:
    messages = [{"op": "request", "id": 1, "value": {"text": "héllo ☃"}}, {"op": "end", "id": 1}]
    data = b"".join(encode_frame(m, 1024) for m in messages)
    assert data[:4] == struct.pack(">I", len(json.dumps(messages[0], ensure_ascii=False, separators=(",", ":")).encode()))
    assert await read(data) == messages
    assert await read(b"") == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">I", 2048) + b"{}", "exceeds"),
        (struct.pack(">I", 10) + b"{}", "inside a frame"),
        (b"\x00\x00", "header"),
        (struct.pack(">I", 2) + b"[]", "not a JSON object"),
        (struct.pack(">I", 3) + b"\xff{}", "not JSON"),
        (struct.pack(">I", 5) + b"{oops", "not JSON"),
    ],
)
async def test_bad_frames_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        await read(data)


def test_an_oversize_frame_is_not_written() -> None:
    with pytest.raises(FrameError, match="exceeds 64"):
        encode_frame({"value": "x" * 64}, 64)
    with pytest.raises(ValueError):
        encode_frame({"value": float("nan")}, 64)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (exc.AuthenticationFailed("unknown peer"), "UNAUTHORIZED"),
        (exc.PermissionDenied("no"), "FORBIDDEN"),
        (exc.ModelNotFound("no model"), "MODEL_NOT_FOUND"),
        (exc.NotFound("no"), "NOT_FOUND"),
        (exc.Conflict("key reused"), "CONFLICT"),
        (exc.QuotaExceeded("spent", 60), "QUOTA_EXCEEDED"),
        (exc.RateLimited("slow down", 2), "RATE_LIMITED"),
        (exc.Overloaded("queue full", 1), "OVERLOADED"),
        (exc.InvalidRequest("bad"), "INVALID_REQUEST"),
        (exc.PayloadTooLarge("big"), "INVALID_REQUEST"),
        (exc.PromptTooLong("long"), "INVALID_REQUEST"),
        (exc.DeadlineExceeded("late"), "TIMEOUT"),
        (exc.ModelNotReady("loading"), "UNAVAILABLE"),
        (exc.WorkerUnavailable("gone"), "UNAVAILABLE"),
        (exc.StoreUnavailable("down"), "UNAVAILABLE"),
        (exc.InternalError("bug"), "INTERNAL"),
    ],
)
def test_every_haif_error_has_its_p2p_code(error: exc.HaifError, code: str) -> None:
    assert rpc_code(error) == code
    wire = to_rpc_error(error)
    assert wire["code"] == code and wire["message"] == error.message
    assert wire["context"]["code"] == error.code and wire["context"]["status"] == error.status_code
    # what a remote peer sends back in these words is the same error here
    back = from_rpc_error({**wire, "context": json.dumps(wire["context"])})
    if isinstance(error, exc.RequestError | exc.DeadlineExceeded | exc.RetryableError):
        assert type(back) is type(error) and back.message == error.message
    else:  # a remote worker's own trouble: to HAIF it is unavailable
        assert type(back) is exc.WorkerUnavailable


def test_retry_after_travels_in_the_context() -> None:
    wire = to_rpc_error(exc.RateLimited("slow down", 2.5))
    assert wire["context"] == {"type": "rate_limit_error", "code": "rate_limit_exceeded", "status": 429, "retry_after_s": 2.5}
    back = from_rpc_error(wire)
    assert isinstance(back, exc.RateLimited) and back.retry_after_s == 2.5


def test_a_bug_is_internal_without_details(caplog: pytest.LogCaptureFixture) -> None:
    wire = to_rpc_error(KeyError("secret detail"))
    assert wire["code"] == "INTERNAL" and wire["message"] == "internal error"
    assert "secret detail" not in json.dumps(wire)
    assert "P2P request failed unexpectedly" in caplog.text


@pytest.mark.parametrize(
    ("error", "cls", "message"),
    [
        ({"code": "UNAVAILABLE", "message": "cannot reach the peer"}, exc.WorkerUnavailable, "cannot reach the peer"),
        ({"code": "UNKNOWN_METHOD", "message": "no such method"}, exc.WorkerUnavailable, "UNKNOWN_METHOD: no such method"),
        ({"code": "TIMEOUT", "message": "late"}, exc.DeadlineExceeded, "late"),
        ({"code": "INVALID_REQUEST", "message": "bad", "context": '{"code": "context_length_exceeded"}'}, exc.PromptTooLong, "bad"),
        ({"code": "INVALID_REQUEST", "message": "bad", "context": "not json"}, exc.InvalidRequest, "bad"),
        ({"code": "INTERNAL", "message": "its bug"}, exc.WorkerUnavailable, "INTERNAL: its bug"),
        ({"code": 5, "message": None}, exc.WorkerUnavailable, "ERROR: P2P request failed"),
        ("garbage", exc.WorkerUnavailable, "a P2P peer answered with a malformed error"),
    ],
)
def test_remote_errors(error: Any, cls: type[exc.HaifError], message: str) -> None:
    back = from_rpc_error(error)
    assert type(back) is cls and back.message == message
