"""One link to the sidecar: the frames after ``hello``, both ways (``sidecar/README.md``).

Inbound, each ``request`` frame runs the :class:`~haif.p2p.handler.InboundHandler` in a
task of its own, answered with ``respond`` or ``chunk``... ``end``; a ``cancel`` frame
cancels the task. A stream's chunks are flow-controlled: the sidecar acknowledges each
once its peer's connection took it (``ack`` frames), at most ``max_stream_buffer_bytes``
of a stream's chunks are unacknowledged at a time, and beyond that the stream is not
read on until the peer catches up (:class:`_Window`). Outbound, :meth:`Link.call` and
:meth:`Link.stream` send a ``call`` frame and wait for its ``result`` (and ``chunk``
frames). When the link closes, what is in flight fails with WorkerUnavailable or is
cancelled: a link never outlives its sidecar process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
import math
import secrets
from typing import TYPE_CHECKING, Any

from haif.exceptions import DeadlineExceeded, HaifError, InvalidRequest, RequestError, WorkerUnavailable
from haif.p2p._frames import FrameError, encode_frame, read_frame
from haif.p2p.errors import from_rpc_error, to_rpc_error
from haif.p2p.keys import parse_public_key

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from haif.p2p.handler import InboundHandler

logger = logging.getLogger("haif.p2p.sidecar")

# A call's answer may come this much after its own deadline (the sidecar's timer fires first).
CALL_GRACE_S = 1.0
MAX_CALL_TIMEOUT_S = 3600.0


class _Window:
    """The chunks of one inbound stream the sidecar has not acknowledged yet, in bytes.

    A chunk is let through while the unacknowledged bytes plus its own stay within the
    bound, or when nothing is unacknowledged (a chunk larger than the bound goes alone).
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._sizes: collections.deque[int] = collections.deque()
        self._held = 0
        self._acked = asyncio.Event()

    async def reserve(self, size: int) -> None:
        while self._sizes and self._held + size > self._max:
            self._acked.clear()
            await self._acked.wait()
        self._sizes.append(size)
        self._held += size

    def ack(self, chunks: int) -> None:
        for _ in range(min(chunks, len(self._sizes))):
            self._held -= self._sizes.popleft()
        self._acked.set()


class _Call:
    """An outbound call in flight: the chunks of a stream (None: no more) and the outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.outcome: asyncio.Future[Any] = loop.create_future()
        self.chunks: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()


class Link:
    """The frames of one sidecar connection, after its hello was accepted."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        *,
        handler: InboundHandler,
        max_frame_bytes: int,
        max_message_bytes: int,
        max_stream_buffer_bytes: int,
        on_ready: Callable[[dict[str, Any]], None],
    ) -> None:
        self._writer = writer
        self._handler = handler
        self._max_frame = max_frame_bytes
        self._max_message = max_message_bytes
        self._max_stream_buffer = max_stream_buffer_bytes
        self._on_ready = on_ready
        self._inbound: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, _Window] = {}  # inbound streams in progress
        self._calls: dict[int, _Call] = {}
        self._call_ids = itertools.count(1)
        self.peers = (0, 0)  # connections (inbound, outbound) the sidecar reported
        self.closed = False

    @property
    def in_flight(self) -> tuple[int, int]:
        """Peers' requests being answered, and calls to remote peers waiting for theirs."""
        return len(self._inbound), len(self._calls)

    async def run(self, reader: asyncio.StreamReader) -> str:
        """Handles frames until the link ends; returns why it ended (then it is closed)."""
        reason = "the P2P sidecar link closed"
        try:
            while (frame := await read_frame(reader, self._max_frame)) is not None:
                self._dispatch(frame)
        except FrameError as exc:
            reason = f"the P2P sidecar link broke: {exc.message}"
            logger.error("%s", reason)
        except ConnectionError as exc:
            reason = f"the P2P sidecar link broke: {exc}"
            logger.warning("%s", reason)
        self.close(reason)
        return reason

    def close(self, reason: str) -> None:
        """Ends the link: inbound handlers are cancelled, calls fail with WorkerUnavailable."""
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        self.peers = (0, 0)
        self._windows.clear()
        for task in self._inbound.values():
            task.cancel()
        self._inbound.clear()
        for call in self._calls.values():
            if not call.outcome.done():
                call.outcome.set_exception(WorkerUnavailable(reason))
            call.chunks.put_nowait(None)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "request":
            self._on_request(frame)
        elif op == "cancel":
            task = self._inbound.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif op == "chunk":
            call = self._calls.get(frame.get("id"))  # type: ignore[arg-type]
            if call is not None:
                call.chunks.put_nowait(("chunk", frame.get("value")))
        elif op == "ack":
            window = self._windows.get(frame.get("id"))  # type: ignore[arg-type]
            chunks = frame.get("chunks")
            if window is not None and isinstance(chunks, int) and chunks > 0:
                window.ack(chunks)
        elif op == "result":
            self._on_result(frame)
        elif op == "ready":
            self._on_ready(frame)
        elif op == "peers":
            inbound, outbound = frame.get("inbound"), frame.get("outbound")
            if isinstance(inbound, int) and isinstance(outbound, int):
                self.peers = (inbound, outbound)
        else:
            logger.warning("P2P link: unknown frame op %r", str(op)[:64])

    async def _send(self, frame: dict[str, Any]) -> None:
        await self._write(encode_frame(frame, self._max_frame))

    async def _write(self, data: bytes) -> None:
        if self.closed:
            raise WorkerUnavailable("the P2P sidecar is not connected")
        self._writer.write(data)
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise WorkerUnavailable(f"the P2P sidecar link broke: {exc}") from exc

    # --- inbound ---------------------------------------------------------------------------

    def _on_request(self, frame: dict[str, Any]) -> None:
        request_id = frame.get("id")
        if not isinstance(request_id, int):
            logger.warning("P2P link: a request without an integer id")
            return
        task = asyncio.create_task(self._serve(request_id, frame), name=f"haif-p2p-request-{request_id}")
        self._inbound[request_id] = task
        task.add_done_callback(lambda _: self._inbound.pop(request_id, None))

    async def _serve(self, request_id: int, frame: dict[str, Any]) -> None:
        method, peer, value = frame.get("method"), frame.get("peer"), frame.get("value")
        try:
            if not isinstance(method, str) or not isinstance(peer, str) or not isinstance(value, dict):
                raise InvalidRequest("malformed request")
            await self._answer(request_id, self._handler(method, peer, value))
        except HaifError as exc:
            log = logger.info if isinstance(exc, RequestError) else logger.warning
            log("P2P %s from %.16s...: %s", method, peer, exc.message)
            await self._respond_error(request_id, exc)
        except Exception as exc:  # a bug in the handler: to_rpc_error logs it with its trace
            await self._respond_error(request_id, exc)

    async def _answer(self, request_id: int, result: Any) -> None:
        if inspect.isawaitable(result):
            result = await result
        if not hasattr(result, "__aiter__"):
            await self._write(self._encode_answer({"op": "respond", "id": request_id, "value": result}))
            return
        window = self._windows[request_id] = _Window(self._max_stream_buffer)
        try:
            async for chunk in result:
                data = self._encode_answer({"op": "chunk", "id": request_id, "value": chunk})
                await window.reserve(len(data))  # a slow peer: wait here, read nothing more
                await self._write(data)
        finally:
            self._windows.pop(request_id, None)
            close = getattr(result, "aclose", None)
            if close is not None:
                await close()
        await self._send({"op": "end", "id": request_id})

    def _encode_answer(self, frame: dict[str, Any]) -> bytes:
        try:
            return encode_frame(frame, self._max_frame)
        except FrameError:
            raise InvalidRequest(f"the answer exceeds p2p.max_message_bytes ({self._max_message})") from None
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the handler's answer is not JSON: {exc}") from exc

    async def _respond_error(self, request_id: int, error: BaseException) -> None:
        with contextlib.suppress(WorkerUnavailable):
            await self._send({"op": "respond", "id": request_id, "error": to_rpc_error(error)})

    # --- outbound --------------------------------------------------------------------------

    async def call(self, peer: str, method: str, value: Any, *, timeout_s: float) -> Any:
        """See :meth:`haif.p2p.Sidecar.call`."""
        call_id, call = await self._start_call(peer, method, value, timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(call.outcome), timeout_s + CALL_GRACE_S)
        except TimeoutError:
            raise _timed_out(method, timeout_s) from None
        finally:
            self._forget(call_id, call)

    async def stream(
        self, peer: str, method: str, value: dict[str, Any], *, timeout_s: float
    ) -> AsyncIterator[Any]:
        """See :meth:`haif.p2p.Sidecar.stream`."""
        envelope = dict(value.get("haif") or {})
        envelope.setdefault("request_id", f"p2p-{secrets.token_hex(12)}")
        value = {**value, "haif": envelope}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + CALL_GRACE_S
        call_id, call = await self._start_call(peer, method, value, timeout_s)
        try:
            while not call.outcome.done() or not call.chunks.empty():
                getter = asyncio.ensure_future(call.chunks.get())
                done, _ = await asyncio.wait(
                    {getter, call.outcome}, timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if getter not in done:
                    getter.cancel()
                    if not done:
                        raise _timed_out(method, timeout_s)
                    continue
                item = getter.result()
                if item is not None:
                    yield item[1]
            yield call.outcome.result()
        finally:
            self._forget(call_id, call)

    async def _start_call(self, peer: str, method: str, value: Any, timeout_s: float) -> tuple[int, _Call]:
        key = parse_public_key(peer)
        if not 0 < timeout_s <= MAX_CALL_TIMEOUT_S:
            raise InvalidRequest(f"timeout_s must be in (0, {MAX_CALL_TIMEOUT_S:g}]")
        call_id = next(self._call_ids)
        call = _Call(asyncio.get_running_loop())
        self._calls[call_id] = call
        try:
            await self._send({
                "op": "call", "id": call_id, "peer": key, "method": method, "value": value,
                "timeout_ms": math.ceil(timeout_s * 1000),
            })
        except FrameError:
            self._calls.pop(call_id, None)
            raise InvalidRequest(f"the value exceeds p2p.max_message_bytes ({self._max_message})") from None
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return call_id, call

    def _forget(self, call_id: int, call: _Call) -> None:
        """Drops a call; one given up on (deadline, caller cancelled) is cancelled in the sidecar."""
        self._calls.pop(call_id, None)
        if not call.outcome.done():
            call.outcome.cancel()
            if not self.closed:
                self._writer.write(encode_frame({"op": "cancel", "id": call_id}, self._max_frame))

    def _on_result(self, frame: dict[str, Any]) -> None:
        call = self._calls.get(frame.get("id"))  # type: ignore[arg-type]
        if call is None or call.outcome.done():
            return
        if "error" in frame:
            call.outcome.set_exception(from_rpc_error(frame["error"]))
        else:
            call.outcome.set_result(frame.get("value"))
        call.chunks.put_nowait(None)


def _timed_out(method: str, timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"P2P {method}: no answer within {timeout_s:g} s")
