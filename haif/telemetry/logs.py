"""JSON logs: one object per line, with the request id, trace id, span id and tenant.

Every serving process calls ``install_json_logs`` once. The request id and tenant are
context variables bound per request (``bind``; ``haif.telemetry.tracing.span`` does it at
each hop's entry); the trace and span ids are those of OpenTelemetry's current span. So a
line logged anywhere while a request is served, in any process, names that request::

    {"ts": "2025-01-01T12:00:00.123+00:00", "level": "WARNING", "logger": "haif.bridge",
     "message": "...", "component": "bridge", "pid": 4242, "request_id": "3f1c...",
     "trace_id": "4bf92f35...", "span_id": "00f067aa...", "tenant": "acme"}

Lines go to the process's own stderr, which Ray keeps in the session's log files.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from haif.config import TelemetryConfig

__all__ = [
    "JsonFormatter",
    "JsonLogHandler",
    "RequestFields",
    "bind",
    "current_fields",
    "install_json_logs",
    "restore",
    "set_tenant",
]

HAIF_LOGGERS = ("haif",)


@dataclass(frozen=True)
class RequestFields:
    """What the log lines of one request carry besides the trace ids."""

    request_id: str | None = None
    tenant: str | None = None


_FIELDS: ContextVar[RequestFields | None] = ContextVar("haif_log_fields", default=None)


def bind(request_id: str | None, tenant: str | None = None) -> RequestFields | None:
    """Bind a request's ids to the current context; returns what ``restore`` puts back."""
    previous = _FIELDS.get()
    _FIELDS.set(RequestFields(request_id, tenant))
    return previous


def restore(previous: RequestFields | None) -> None:
    """Put back the fields ``bind`` returned (by value: safe from another context)."""
    _FIELDS.set(previous)


def set_tenant(tenant: str) -> None:
    """Record the tenant once known (after authentication) for the rest of the request."""
    _FIELDS.set(replace(_FIELDS.get() or RequestFields(), tenant=tenant))


def current_fields() -> RequestFields | None:
    return _FIELDS.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record; request fields and trace ids only where known."""

    def __init__(self, component: str | None = None) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.component:
            out["component"] = self.component
        out["pid"] = record.process
        fields = _FIELDS.get()
        if fields is not None:
            if fields.request_id:
                out["request_id"] = fields.request_id
            if fields.tenant:
                out["tenant"] = fields.tenant
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            out["trace_id"] = f"{span_context.trace_id:032x}"
            out["span_id"] = f"{span_context.span_id:016x}"
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class JsonLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``install_json_logs`` puts on the root logger (found again by its type)."""


def install_json_logs(
    config: TelemetryConfig, component: str, stream: IO[str] | None = None
) -> JsonLogHandler | None:
    """Set HAIF's log level and, when ``json_logs``, write every record as a JSON line.

    The handler goes on the root logger (replacing one installed before), so that other
    libraries' records are JSON too; it writes to the process's real stderr, even where
    Ray Serve has redirected ``sys.stderr`` into its own logger.
    """
    for name in HAIF_LOGGERS:
        logging.getLogger(name).setLevel(config.log_level)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, JsonLogHandler)]:
        root.removeHandler(handler)
    if not config.json_logs:
        return None
    handler = JsonLogHandler(stream or sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root.addHandler(handler)
    return handler
