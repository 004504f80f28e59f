"""haif.telemetry.tracing: traceparent <-> context, export settings, providers, span helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from haif.config import TelemetryConfig
from haif.envelope import Principal, RequestContext, traceparent_from
from haif.exceptions import AuthenticationFailed, ConfigError
from haif.telemetry import logs, tracing

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def recorder() -> Iterator[InMemorySpanExporter]:
    """Spans of this process, recorded in memory (the global provider can be set once)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter


@pytest.fixture
def spans(recorder: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    recorder.clear()
    yield recorder
    recorder.clear()


def ctx(traceparent: str | None = TRACEPARENT, tenant: str | None = None) -> RequestContext:
    rc = RequestContext.new(timeout_s=30, api_key="sk-secret-key-0123456789", request_id="req-1",
                            traceparent=traceparent)
    return rc.authenticated(Principal(tenant=tenant)) if tenant else rc


# --- traceparent <-> context ----------------------------------------------------------------


def test_traceparent_round_trips_through_a_context() -> None:
    span = trace.NonRecordingSpan(trace.get_current_span(tracing.context_from(TRACEPARENT)).get_span_context())
    assert tracing.traceparent_of(span) == TRACEPARENT


@pytest.mark.parametrize("bad", [None, "", "00-zz-00f067aa0ba902b7-01", f"00-{'0' * 32}-{PARENT_ID}-01"])
def test_missing_or_malformed_traceparent_starts_a_new_trace(bad: str | None) -> None:
    parent = trace.get_current_span(tracing.context_from(bad)).get_span_context()
    assert not parent.is_valid


def test_child_span_keeps_the_clients_trace_id_and_names_its_parent(spans: InMemorySpanExporter) -> None:
    with tracing.span("hop", ctx()) as span:
        carried = tracing.traceparent_of()
    (done,) = spans.get_finished_spans()
    assert f"{done.context.trace_id:032x}" == TRACE_ID
    assert f"{done.parent.span_id:016x}" == PARENT_ID
    assert carried == f"00-{TRACE_ID}-{done.context.span_id:016x}-01"
    assert traceparent_from(carried) == carried  # the envelope accepts what the tracer writes
    assert span.attributes[tracing.REQUEST_ID] == "req-1"


def test_handoff_carries_the_current_span_to_the_next_hop(spans: InMemorySpanExporter) -> None:
    sent = ctx()
    with tracing.span("gateway", sent):
        next_ctx = tracing.handoff_ctx(sent)
    with tracing.span("orchestrator", next_ctx):
        pass
    gateway, orchestrator = spans.get_finished_spans()
    assert orchestrator.parent.span_id == gateway.context.span_id
    assert orchestrator.context.trace_id == gateway.context.trace_id
    assert next_ctx.sent_at is not None and next_ctx.request_id == sent.request_id


def test_handoff_without_a_span_keeps_the_incoming_traceparent() -> None:
    assert tracing.handoff_ctx(ctx()).traceparent == TRACEPARENT


def test_a_request_without_traceparent_starts_a_trace(spans: InMemorySpanExporter) -> None:
    with tracing.span("hop", ctx(traceparent=None)):
        pass
    (done,) = spans.get_finished_spans()
    assert done.parent is None and done.context.is_valid


# --- errors and events ------------------------------------------------------------------------


def test_an_error_marks_the_span_and_never_records_the_api_key(spans: InMemorySpanExporter) -> None:
    request = ctx()
    with pytest.raises(AuthenticationFailed), tracing.span("gateway.auth", request):
        raise AuthenticationFailed("invalid API key")
    (done,) = spans.get_finished_spans()
    assert done.status.status_code is StatusCode.ERROR
    assert "AuthenticationFailed" in done.status.description
    (event,) = done.events
    assert event.name == "exception"
    assert event.attributes["exception.type"].endswith("AuthenticationFailed")
    assert done.attributes[tracing.STATUS] == "invalid_api_key"
    assert request.api_key not in repr(done.to_json())


def test_cancellation_is_an_event_not_an_error(spans: InMemorySpanExporter) -> None:
    with pytest.raises(asyncio.CancelledError), tracing.span("worker.stream", ctx()):
        raise asyncio.CancelledError
    (done,) = spans.get_finished_spans()
    assert done.status.status_code is StatusCode.UNSET
    assert [e.name for e in done.events] == ["cancelled"]


def test_add_event_lands_on_the_current_span(spans: InMemorySpanExporter) -> None:
    with tracing.span("gateway.route", ctx()):
        tracing.add_event("retry", {"attempt": 1, "reason": "WorkerUnavailable"})
    (done,) = spans.get_finished_spans()
    assert [(e.name, dict(e.attributes)) for e in done.events] == [
        ("retry", {"attempt": 1, "reason": "WorkerUnavailable"})
    ]


def test_record_span_spans_the_given_times(spans: InMemorySpanExporter) -> None:
    tracing.record_span("worker.queue_wait", ctx(), 100.0, 100.25)
    (done,) = spans.get_finished_spans()
    assert (done.start_time, done.end_time) == (100_000_000_000, 100_250_000_000)
    assert f"{done.parent.span_id:016x}" == PARENT_ID


def test_span_binds_the_request_ids_for_logs_and_restores_them() -> None:
    assert logs.current_fields() is None
    with tracing.span("hop", ctx(tenant="acme")):
        assert logs.current_fields() == logs.RequestFields("req-1", "acme")
    assert logs.current_fields() is None


async def test_a_span_held_across_an_async_generator_survives_a_resume_in_another_task(
    spans: InMemorySpanExporter,
) -> None:
    async def stream() -> Any:
        with tracing.span("worker.stream", ctx()):
            yield 1
            yield 2

    async def main() -> list[int]:
        gen = stream()
        first = await asyncio.create_task(gen.__anext__())  # each step in its own task
        second = await asyncio.create_task(gen.__anext__())
        await asyncio.create_task(gen.aclose())
        return [first, second]

    assert await main() == [1, 2]
    (done,) = spans.get_finished_spans()
    assert done.name == "worker.stream" and done.end_time is not None


# --- set-up ------------------------------------------------------------------------------------


def test_no_endpoint_anywhere_means_no_export() -> None:
    assert tracing.export_target(TelemetryConfig(), environ={}) is None


def test_config_endpoint_is_a_base_url_like_the_standard_variable() -> None:
    target = tracing.export_target(TelemetryConfig(otlp_endpoint="http://127.0.0.1:4318/"), environ={})
    assert target == tracing.ExportTarget("http/protobuf", "http://127.0.0.1:4318/v1/traces")
    grpc = tracing.export_target(
        TelemetryConfig(otlp_endpoint="http://127.0.0.1:4317", otlp_protocol="grpc"), environ={}
    )
    assert grpc == tracing.ExportTarget("grpc", "http://127.0.0.1:4317")


def test_standard_variables_are_honoured() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert tracing.export_target(TelemetryConfig(), environ=env) == tracing.ExportTarget("grpc", None)
    assert tracing.export_target(TelemetryConfig(), environ={**env, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.export_target(TelemetryConfig(), environ={**env, "OTEL_TRACES_EXPORTER": "none"}) is None


def test_an_unsupported_protocol_is_a_config_error() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(ConfigError, match="http/json"):
        tracing.export_target(TelemetryConfig(), environ=env)


def test_exporters_follow_the_protocol() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    http = tracing.create_exporter(tracing.ExportTarget("http/protobuf", "http://127.0.0.1:1/v1/traces"))
    grpc = tracing.create_exporter(tracing.ExportTarget("grpc", "http://127.0.0.1:1"))
    try:
        assert isinstance(http, Http) and isinstance(grpc, Grpc)
    finally:
        http.shutdown()
        grpc.shutdown()


def test_provider_with_an_exporter_records_with_the_components_resource() -> None:
    exporter = InMemorySpanExporter()
    provider = tracing.build_provider(
        TelemetryConfig(service_name="haif"), "gateway", exporter, region="eu", instance="r1", environ={}
    )
    with provider.get_tracer("t").start_as_current_span("s", context=tracing.context_from(TRACEPARENT)):
        pass
    provider.force_flush()
    (done,) = exporter.get_finished_spans()
    resource = done.resource.attributes
    assert resource["service.name"] == "haif-gateway"
    assert (resource["cloud.region"], resource["service.instance.id"], resource["haif.component"]) == (
        "eu", "r1", "gateway"
    )
    provider.shutdown()


def test_otel_service_name_wins_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "mine")
    provider = tracing.build_provider(TelemetryConfig(), "worker", InMemorySpanExporter())
    assert provider.resource.attributes["service.name"] == "mine"
    assert provider.resource.attributes["haif.component"] == "worker"
    provider.shutdown()


def test_provider_without_exporter_records_nothing_but_still_makes_ids() -> None:
    provider = tracing.build_provider(TelemetryConfig(), "bridge", None, environ={})
    parent = tracing.context_from(TRACEPARENT)
    span = provider.get_tracer("t").start_span("s", context=parent)
    assert not span.is_recording()
    ids = span.get_span_context()
    assert ids.is_valid and f"{ids.trace_id:032x}" == TRACE_ID and f"{ids.span_id:016x}" != PARENT_ID
    span.end()


def test_sample_ratio_zero_records_no_new_trace_but_follows_a_sampled_parent() -> None:
    provider = tracing.build_provider(TelemetryConfig(sample_ratio=0.0), "bridge", InMemorySpanExporter(),
                                      environ={})
    tracer = provider.get_tracer("t")
    assert not tracer.start_span("root").is_recording()
    assert tracer.start_span("child", context=tracing.context_from(TRACEPARENT)).is_recording()
    provider.shutdown()


def test_otel_environment_keeps_only_otel_variables() -> None:
    env = {"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "HOME": "/root"}
    assert tracing.otel_environment(env) == {
        "OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"
    }


# --- the Bridge's server span ------------------------------------------------------------------


def edge_app() -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from haif.bridge.middleware import EdgeMiddleware

    app = FastAPI()

    @app.get("/v1/things/{thing_id}")
    async def thing(thing_id: int) -> dict[str, Any]:
        return {"id": thing_id, "traceparent": tracing.traceparent_of()}

    @app.get("/v1/broken")
    async def broken() -> JSONResponse:
        return JSONResponse({"error": "down"}, status_code=503)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(EdgeMiddleware, max_body_bytes=1024)
    return app


def test_the_edge_span_is_the_clients_child_and_the_parent_of_what_follows(
    spans: InMemorySpanExporter,
) -> None:
    from starlette.testclient import TestClient

    with TestClient(edge_app()) as client:
        resp = client.get("/v1/things/7", headers={"traceparent": TRACEPARENT, "X-Request-ID": "req-9"})
    assert resp.status_code == 200
    (done,) = spans.get_finished_spans()
    assert done.name == "GET /v1/things/{thing_id}"
    assert done.kind is trace.SpanKind.SERVER
    assert f"{done.parent.span_id:016x}" == PARENT_ID and f"{done.context.trace_id:032x}" == TRACE_ID
    assert done.attributes["http.response.status_code"] == 200
    assert done.attributes[tracing.REQUEST_ID] == "req-9"
    assert resp.json()["traceparent"] == f"00-{TRACE_ID}-{done.context.span_id:016x}-01"


def test_a_5xx_marks_the_edge_span_failed_and_probes_make_no_span(spans: InMemorySpanExporter) -> None:
    from starlette.testclient import TestClient

    with TestClient(edge_app()) as client:
        assert client.get("/v1/broken").status_code == 503
        assert client.get("/healthz").status_code == 200
    (done,) = spans.get_finished_spans()
    assert done.name == "GET /v1/broken"
    assert done.status.status_code is StatusCode.ERROR
    assert done.parent is None  # no traceparent: a new trace


def test_record_span_under_a_span(spans: InMemorySpanExporter) -> None:
    with tracing.span("runtime.stream", ctx()) as stream:
        tracing.record_span("runtime.first_token", stream, 1.0)
    first, parent = spans.get_finished_spans()
    assert first.parent.span_id == parent.context.span_id


async def test_a_retry_is_an_event_on_the_route_span(spans: InMemorySpanExporter) -> None:
    from haif.config import HaifConfig, LimitsConfig
    from haif.envelope import build_work_item
    from haif.exceptions import WorkerUnavailable
    from haif.orchestrator.breaker import Backoff
    from haif.orchestrator.router import Router
    from haif.orchestrator.table import ModelRoutes, RoutingTable, WorkerRoute
    from haif.protocol import CompletionRequest

    config = HaifConfig.model_validate({"models": [{"name": "m", "runtime": "echo"}]})
    router = Router(config)  # the retry path alone: no Ray, no Serve
    router._backoff = Backoff(0.0, 0.0)
    worker = WorkerRoute("m/local/0#ab", None, "local", "shared", "ready", 4)
    router.update(RoutingTable.of({"m": ModelRoutes(name="m", kind="generate", workers=(worker,))}))
    model = router.models["m"]
    backend = model.backends[worker.worker_id]
    item = build_work_item("completion", CompletionRequest(model="m", prompt="hi"), ctx(), LimitsConfig())

    async def attempt() -> None:
        with tracing.span("gateway.route", item.ctx):
            await router._attempt_failed(model, backend, WorkerUnavailable("draining"), item, 0.0, 1)

    await attempt()
    (route,) = [s for s in spans.get_finished_spans() if s.name == "gateway.route"]
    (event,) = route.events
    assert event.name == "retry"
    assert event.attributes["haif.attempt"] == 1
    assert event.attributes["haif.reason"] == "worker_unavailable"
    assert event.attributes["haif.worker"] == "m/local/0#ab"
    assert router.retries == 1
