"""The benchmarks' OTLP receiver process (tests/support/otlp.py): a child process on loopback."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_the_benchmarks_receiver_process_counts_the_exports_it_answers() -> None:
    import httpx
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from tests.support.otlp import ReceiverProcess

    body = ExportTraceServiceRequest().SerializeToString()  # an empty export
    with ReceiverProcess() as receiver:
        for _ in range(3):
            answer = httpx.post(
                f"{receiver.endpoint}/v1/traces", content=body,
                headers={"content-type": "application/x-protobuf"},
            )
            assert answer.status_code == 200
        assert httpx.post(f"{receiver.endpoint}/elsewhere", content=b"").status_code == 404
    assert receiver.requests == 3
