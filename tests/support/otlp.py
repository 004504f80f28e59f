"""An OTLP/HTTP trace receiver on loopback: real HTTP, decodes the real protobuf export.

What a collector would see: each POST to ``/v1/traces`` is an ``ExportTraceServiceRequest``
(``opentelemetry-proto``). Every span is kept (bounded), with its resource's service name;
tests pick their own request's spans by trace id.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support.loopback import LoopbackServer

MAX_SPANS = 200_000
_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: str
    status_message: str
    events: list[dict[str, Any]] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one serialized ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        kind=_KINDS.get(s.kind, str(s.kind)),
                        service=str(resource.get("service.name", "")),
                        attributes=_attributes(s.attributes),
                        resource=resource,
                        status=_STATUS.get(s.status.code, str(s.status.code)),
                        status_message=s.status.message,
                        events=[
                            {"name": e.name, "attributes": _attributes(e.attributes)} for e in s.events
                        ],
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                    )
                )
    return out


class OtlpReceiver(LoopbackServer):
    """Accepts OTLP/HTTP protobuf exports on loopback. ``endpoint`` is the base URL to
    configure (as ``OTEL_EXPORTER_OTLP_ENDPOINT``); with ``keep=False`` it only counts."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.requests = 0
        self.bytes = 0
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path.rstrip("/") != "/v1/traces":
                    self._answer(404, b"")
                    return
                spans = decode(body) if receiver.keep else []
                with receiver._lock:
                    receiver.requests += 1
                    receiver.bytes += len(body)
                    room = MAX_SPANS - len(receiver.spans)
                    receiver.spans.extend(spans[: max(room, 0)])
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                return None

        self.endpoint = self._listen(Handler)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for_trace(
        self, trace_id: str, count: int, timeout_s: float = 30.0
    ) -> list[ReceivedSpan]:
        """The spans of ``trace_id`` once ``count`` have arrived (polled, with a deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


class ReceiverProcess:
    """An ``OtlpReceiver(keep=False)`` in a process of its own, as a collector would be:
    a receiver in the benchmark's process would handle exports on the GIL of the client
    that measures latency. ``requests``/``bytes`` are read when the block ends."""

    def __init__(self) -> None:
        self.endpoint = ""
        self.requests = 0
        self.bytes = 0

    def __enter__(self) -> ReceiverProcess:
        import subprocess
        import sys
        from pathlib import Path

        self._proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.support.otlp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2],  # the repository root: `tests` imports
        )
        assert self._proc.stdout is not None
        self.endpoint = self._proc.stdout.readline().strip()
        if not self.endpoint.startswith("http://"):
            self._proc.kill()
            raise RuntimeError(f"the OTLP receiver did not start: {self.endpoint!r}")
        return self

    def __exit__(self, *_: Any) -> None:
        import subprocess

        try:
            out, _err = self._proc.communicate(timeout=30)  # closes its stdin: it reports, exits
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return  # the counts stay 0: never mask what the block raised
        parts = out.split()
        if len(parts) == 2:
            self.requests, self.bytes = int(parts[0]), int(parts[1])


def _serve() -> None:
    """``python -m tests.support.otlp``: print the endpoint, count exports until stdin closes,
    then print ``<requests> <bytes>``."""
    import sys

    with OtlpReceiver(keep=False) as receiver:
        print(receiver.endpoint, flush=True)
        sys.stdin.read()
        print(receiver.requests, receiver.bytes, flush=True)


if __name__ == "__main__":
    _serve()
