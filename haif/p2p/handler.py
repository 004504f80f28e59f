"""What HAIF plugs into the P2P shim: the handler of inbound requests, and the method names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

# Served to peers (DESIGN.md §3 "P2P"): each value is the HTTP API's request body.
INBOUND_METHODS = ("haif.models", "haif.completions", "haif.chat", "haif.embeddings")
# Served by a remote P2P worker, called by HAIF.
WORKER_METHODS = ("haif.worker.infer", "haif.worker.health")
# A streamed answer: each chunk is an event of this name, {id, chunk}; the request's own
# answer comes last, {object: STREAM_END, id, chunks}.
STREAM_EVENT = "haif.stream.chunk"
STREAM_END = "haif.stream.end"


class InboundHandler(Protocol):
    """Answers one request a peer made: ``handler(method, peer, value)``.

    ``method`` is one of the methods the sidecar serves, ``peer`` the caller's Noise
    public key (64 hex characters, verified by the Noise handshake), ``value`` the
    decoded JSON object the peer sent. The result is the JSON value to answer with, or
    an async iterator of JSON chunks to stream (each reaches the peer as a
    ``haif.stream.chunk`` event as soon as it is yielded). A coroutine may return either;
    an async generator function works as is.

    Raise a HaifError to refuse or fail: the peer gets its P2P code (haif/p2p/errors.py)
    and its message. Anything else is answered ``INTERNAL`` and logged as a bug. When the
    peer goes away or the sidecar's deadline passes, the handler's task is cancelled.
    """

    def __call__(
        self, method: str, peer: str, value: dict[str, Any]
    ) -> Awaitable[Any] | AsyncIterator[Any]: ...
