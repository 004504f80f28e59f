"""OpenTelemetry traces: one trace per request, carried by HAIF itself across Ray hops.

Ray's own tracing hook does not survive Ray Serve, so HAIF carries the W3C
``traceparent`` of each hop's current span in the request envelope
(``RequestContext.traceparent``) and the next hop starts its spans as children of it.
``context_from`` and ``traceparent_of`` are the one place that converts between that
string and an OpenTelemetry context.

Every serving process (each Serve replica, each worker actor) calls ``setup_tracing``
once. With an OTLP endpoint (``telemetry.otlp_endpoint``, or the standard
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``) spans are recorded and exported by a
``BatchSpanProcessor`` from a background thread, never on the request path. Without one
they are not recorded, yet each still gets its own span id, so that the traceparent
carried onwards and the ids in the logs stay right at almost no cost.

A hop's code reads::

    with tracing.span("gateway.stream", item.ctx, attributes={tracing.MODEL: item.model}):
        ...
        await orchestrator.stream.remote(tracing.handoff(item))   # children parent here

``span`` records an exception on the span (status ERROR plus an ``exception`` event) and
binds the request's ids for the JSON logs (``haif.telemetry.logs``); ``add_event`` adds
an event to whatever span is current (retries, fail-overs).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from haif.exceptions import ConfigError, HaifError
from haif.telemetry import logs

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from haif.config import TelemetryConfig
    from haif.envelope import RequestContext, WorkItem

__all__ = [
    "ExportTarget",
    "SpanKind",
    "activate",
    "add_event",
    "build_provider",
    "context_from",
    "create_exporter",
    "entry_span",
    "export_target",
    "handoff",
    "handoff_ctx",
    "otel_environment",
    "record_error",
    "record_span",
    "set_attributes",
    "set_error",
    "setup_tracing",
    "span",
    "start_span",
    "traceparent_of",
]

Protocol = Literal["http/protobuf", "grpc"]
PROTOCOLS: tuple[Protocol, ...] = ("http/protobuf", "grpc")
TRACES_PATH = "/v1/traces"
TRACER_NAME = "haif"

# Span attributes HAIF sets (token counts follow the GenAI semantic conventions).
REQUEST_ID = "haif.request_id"
TENANT = "haif.tenant"
MODEL = "haif.model"
MODEL_VERSION = "haif.model.version"
ADAPTER = "haif.adapter"  # a LoRA adapter's served name (the model is its base)
WORKER = "haif.worker"
REGION = "haif.region"
STATUS = "haif.status"
CANCELLED = "haif.cancelled"
PROMPT_TOKENS = "gen_ai.usage.input_tokens"
COMPLETION_TOKENS = "gen_ai.usage.output_tokens"

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer(TRACER_NAME)
_CANCELLATION = (GeneratorExit, asyncio.CancelledError)


# --- set-up, once per process ------------------------------------------------------------


@dataclass(frozen=True)
class ExportTarget:
    """Where a process exports spans. ``endpoint`` None: the exporter reads the OTEL_* env."""

    protocol: Protocol
    endpoint: str | None


def _env_flag(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip().lower()


def export_target(
    config: TelemetryConfig, environ: Mapping[str, str] = os.environ
) -> ExportTarget | None:
    """Where to export, from the config and then the standard OTEL_* variables; None: nowhere.

    ``telemetry.otlp_endpoint`` is a base URL like ``OTEL_EXPORTER_OTLP_ENDPOINT``: over
    http/protobuf the traces path ``/v1/traces`` is appended unless it is already there.

    Raises:
        ConfigError: the OTLP protocol named in the environment is not supported.
    """
    if _env_flag(environ, "OTEL_SDK_DISABLED") == "true":
        return None
    endpoint = config.otlp_endpoint
    if endpoint is None:
        if _env_flag(environ, "OTEL_TRACES_EXPORTER") == "none":
            return None
        named = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        if not any(environ.get(name) for name in named):
            return None
    protocol = (
        config.otlp_protocol
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"OTLP protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    if endpoint is not None and protocol == "http/protobuf":
        base = endpoint.rstrip("/")
        endpoint = base if base.endswith(TRACES_PATH) else base + TRACES_PATH
    return ExportTarget(protocol=protocol, endpoint=endpoint)  # type: ignore[arg-type]


def create_exporter(target: ExportTarget) -> SpanExporter:
    """The OTLP span exporter of ``target`` (its other settings from the OTEL_* env)."""
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http(endpoint=target.endpoint)


def build_provider(
    config: TelemetryConfig,
    component: str,
    exporter: SpanExporter | None,
    *,
    region: str | None = None,
    instance: str | None = None,
    node: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> TracerProvider:
    """A tracer provider for one process of ``component`` (bridge, gateway, orchestrator, worker).

    The service name is ``<service_name>-<component>`` unless OTEL_SERVICE_NAME is set;
    OTEL_RESOURCE_ATTRIBUTES add to the resource. Without an exporter nothing is recorded.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

    attributes: dict[str, Any] = {
        "service.namespace": config.service_name,
        "haif.component": component,
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"{config.service_name}-{component}"
    optional = {"cloud.region": region, "service.instance.id": instance, "haif.node_id": node}
    attributes.update({key: value for key, value in optional.items() if value})
    sampler: Any
    if exporter is None:
        sampler = ALWAYS_OFF  # ids only: nothing is recorded, nothing exported
    elif "sample_ratio" not in config.model_fields_set and environ.get("OTEL_TRACES_SAMPLER"):
        sampler = None  # the SDK reads OTEL_TRACES_SAMPLER[_ARG]
    else:
        sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=config.max_queued_spans,
                schedule_delay_millis=config.export_interval_ms,
            )
        )
    return provider


def setup_tracing(
    config: TelemetryConfig,
    component: str,
    *,
    region: str | None = None,
    instance: str | None = None,
) -> bool:
    """Install this process's tracer provider (once; later calls keep the first).

    Returns:
        Whether this process exports spans.

    Raises:
        ConfigError: the OTLP settings are not usable.
    """
    from opentelemetry.sdk.trace import TracerProvider

    target = export_target(config)
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return target is not None
    exporter = create_exporter(target) if target is not None else None
    provider = build_provider(
        config, component, exporter, region=region, instance=instance, node=_ray_node_id()
    )
    trace.set_tracer_provider(provider)
    return exporter is not None


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray (tools, tests): the resource simply lacks the node
        return None


def otel_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The OTEL_* variables of this process, to hand on to the processes it starts.

    Serve replicas with a runtime_env of their own do not inherit the job's variables.
    """
    return {k: v for k, v in environ.items() if k.startswith("OTEL_")}


# --- traceparent <-> context: the one place ----------------------------------------------


def context_from(traceparent: str | None) -> Context:
    """The OpenTelemetry context whose parent is ``traceparent``; an empty one (a new trace)
    when it is missing or malformed."""
    from opentelemetry.context import Context

    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({"traceparent": traceparent}, context=Context())


def traceparent_of(span: Span | None = None) -> str | None:
    """The W3C traceparent of ``span`` (default: the current span); None when it has no ids."""
    span = span or trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def handoff_ctx(ctx: RequestContext) -> RequestContext:
    """``ctx`` as the next hop must receive it: the current span as parent, the send time."""
    return replace(ctx, traceparent=traceparent_of() or ctx.traceparent, sent_at=time.time())


def handoff(item: WorkItem) -> WorkItem:
    """``item`` with its context handed off (see ``handoff_ctx``)."""
    return item.with_ctx(handoff_ctx(item.ctx))


# --- spans ---------------------------------------------------------------------------------


def start_span(
    name: str,
    parent: RequestContext | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time_s: float | None = None,
) -> Span:
    """A started span, not made current: child of ``parent``'s traceparent when given, else
    of the current span. End it yourself."""
    context = context_from(parent.traceparent) if parent is not None else None
    start_ns = int(start_time_s * 1e9) if start_time_s is not None else None
    return _TRACER.start_span(
        name, context=context, kind=kind, attributes=_present(attributes), start_time=start_ns
    )


@contextmanager
def activate(span: Span, request: RequestContext | None = None) -> Iterator[Span]:
    """Make ``span`` current (and bind ``request``'s ids for the logs); record what is raised.

    The previous context is restored by value, not by token, so that this may enclose the
    ``yield`` of an async generator that another task resumes or closes.
    """
    previous = otel_context.get_current()
    otel_context.attach(trace.set_span_in_context(span, previous))
    fields = logs.bind(request.request_id, _tenant_of(request)) if request is not None else None
    try:
        yield span
    except BaseException as exc:
        record_error(span, exc)
        raise
    finally:
        otel_context.attach(previous)
        if request is not None:
            logs.restore(fields)


@contextmanager
def span(
    name: str,
    parent: RequestContext | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A current span for the block. With ``parent`` (the hop's RequestContext) it is the
    child of the span that handed the request off, and the logs carry the request's ids."""
    started = start_span(name, parent, kind=kind, attributes=attributes)
    if parent is not None:
        started.set_attribute(REQUEST_ID, parent.request_id)
    try:
        with activate(started, parent):
            yield started
    finally:
        started.end()


@contextmanager
def entry_span(
    name: str,
    traceparent: str | None,
    request_id: str,
    *,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """The SERVER span of a request entering HAIF: child of the client's ``traceparent``
    (a new trace when it has none)."""
    started = _TRACER.start_span(
        name, context=context_from(traceparent), kind=SpanKind.SERVER, attributes=attributes
    )
    started.set_attribute(REQUEST_ID, request_id)
    previous = logs.bind(request_id)
    try:
        with activate(started):
            yield started
    finally:
        started.end()
        logs.restore(previous)


def record_span(
    name: str,
    parent: RequestContext | Span,
    start_time_s: float,
    end_time_s: float | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Record a span that already happened, ending now unless ``end_time_s`` is given (a
    queue wait that began in another process, the time to a stream's first token).

    Args:
        parent: the hop's RequestContext (its traceparent is the parent) or a span.
    """
    from haif.envelope import RequestContext

    context = (
        context_from(parent.traceparent) if isinstance(parent, RequestContext)
        else trace.set_span_in_context(parent)
    )
    done = _TRACER.start_span(
        name, context=context, attributes=_present(attributes),
        start_time=int(start_time_s * 1e9),
    )
    done.end(end_time=int((end_time_s if end_time_s is not None else time.time()) * 1e9))


def record_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc``: status ERROR and an ``exception`` event.

    A cancellation (client gone, deadline upstream) is not a failure of the span: it gets a
    ``cancelled`` event instead. Messages of HAIF errors never hold secrets (API keys).
    """
    if not span.is_recording():
        return
    if isinstance(exc, _CANCELLATION):
        span.set_attribute(CANCELLED, True)
        span.add_event("cancelled")
        return
    message = exc.message if isinstance(exc, HaifError) else str(exc)
    span.set_attribute(STATUS, exc.code if isinstance(exc, HaifError) else type(exc).__name__)
    span.record_exception(exc, escaped=True)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"[:500]))


def set_error(span: Span, description: str) -> None:
    """Mark ``span`` failed without an exception (e.g. an HTTP 5xx written by a handler)."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, description))


def add_event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Add an event to the current span (e.g. ``retry`` with the attempt and the reason)."""
    trace.get_current_span().add_event(name, attributes=attributes)


def set_attributes(attributes: Mapping[str, Any], span: Span | None = None) -> None:
    """Set attributes on ``span`` (default: the current span); None values are skipped."""
    target = span or trace.get_current_span()
    if target.is_recording():
        target.set_attributes(_present(attributes))


def _present(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``attributes`` without None values (OpenTelemetry refuses them, with a warning)."""
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


def _tenant_of(request: RequestContext) -> str | None:
    return request.principal.tenant if request.principal is not None else None
