"""The sidecar link's framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.

One JSON object per frame, both ways (``sidecar/lib/frames.js`` is the Node side). A
frame larger than the bound is refused when written and ends the link when read: the
other end is HAIF's own sidecar, so a bad frame is a bug or a foreign process, never
something to recover from in place.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import TYPE_CHECKING, Any

from haif.exceptions import InternalError

if TYPE_CHECKING:
    from collections.abc import Mapping

HEADER = struct.Struct(">I")


class FrameError(InternalError):
    """A frame that is too large, or not a JSON object."""

    code = "frame_error"


def encode_frame(message: Mapping[str, Any], max_bytes: int) -> bytes:
    """``message`` as one frame.

    Raises:
        FrameError: the JSON is larger than ``max_bytes``.
        TypeError, ValueError: ``message`` holds something JSON cannot carry.
    """
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > max_bytes:
        raise FrameError(f"frame of {len(body)} bytes exceeds {max_bytes}")
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> dict[str, Any] | None:
    """The next frame, or None at a clean end of stream (between frames).

    Raises:
        FrameError: an oversize length, a frame cut short, or a body that is not a JSON object.
    """
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("the link closed inside a frame header") from None
    (length,) = HEADER.unpack(head)
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes exceeds {max_bytes}")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError("the link closed inside a frame") from None
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    return message
