"""haif.telemetry.logs: one JSON object per line, with the request's ids where known."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from haif.config import TelemetryConfig
from haif.telemetry import logs

pytestmark = pytest.mark.unit

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logs.install_json_logs(TelemetryConfig(log_level="INFO"), "gateway", stream=stream)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_outside_any_request_has_no_request_fields(captured: io.StringIO) -> None:
    logging.getLogger("haif.test").info("hello %s", "world")
    (line,) = lines(captured)
    assert line["message"] == "hello world"
    assert (line["level"], line["logger"], line["component"]) == ("INFO", "haif.test", "gateway")
    assert not {"request_id", "trace_id", "span_id", "tenant"} & set(line)


def test_a_line_within_a_request_carries_its_ids_and_tenant(captured: io.StringIO) -> None:
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    previous = logs.bind("req-42")
    try:
        logs.set_tenant("acme")
        with trace.use_span(span):
            logging.getLogger("haif.gateway").warning("quota low")
    finally:
        logs.restore(previous)
    (line,) = lines(captured)
    assert line["request_id"] == "req-42"
    assert line["tenant"] == "acme"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["span_id"] == "00f067aa0ba902b7"
    assert logs.current_fields() is None


def test_exceptions_stay_inside_the_one_json_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("haif.worker").exception("failed")
    (line,) = lines(captured)
    assert "ValueError: bad" in str(line["exception"])


def test_haif_debug_lines_follow_the_configured_level(captured: io.StringIO) -> None:
    logging.getLogger("haif.test").debug("hidden")
    assert lines(captured) == []


def test_installing_twice_keeps_one_handler() -> None:
    config = TelemetryConfig()
    first = logs.install_json_logs(config, "worker", stream=io.StringIO())
    second = logs.install_json_logs(config, "worker", stream=io.StringIO())
    root = logging.getLogger()
    try:
        assert [h for h in root.handlers if isinstance(h, logs.JsonLogHandler)] == [second]
        assert first not in root.handlers
    finally:
        root.removeHandler(second)


def test_json_logs_off_installs_no_handler() -> None:
    assert logs.install_json_logs(TelemetryConfig(json_logs=False), "worker") is None
    assert not [h for h in logging.getLogger().handlers if isinstance(h, logs.JsonLogHandler)]
