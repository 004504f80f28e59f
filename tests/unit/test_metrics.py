"""Platform metrics: the per-process registry, the merge across processes, the exposition."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from haif.bridge.middleware import EdgeMiddleware, MetricsMiddleware
from haif.config import load_config
from haif.exceptions import (
    AuthenticationFailed,
    ConfigError,
    MetricsUnavailable,
    ModelNotFound,
    RateLimited,
)
from haif.gateway.metrics import GatewayMetrics
from haif.protocol import CompletionRequest
from haif.store import Database
from haif.store.quotas import QuotaLimits
from haif.telemetry._aggregate import Aggregate
from haif.telemetry._catalog import CATALOG, ITL_BUCKETS_S, SPECS
from haif.telemetry._registry import HistogramValue, Registry
from haif.telemetry.metrics import (
    BridgeMetrics,
    MetricsReader,
    MetricsTarget,
    OrchestratorMetrics,
    ProcessMetrics,
    WorkerMetrics,
)
from tests.support.admission import admission, answer, item, make_tenant
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.unit

REQUESTS = "haif_requests_total"
OK = ("echo", "1", "completion", "ok")


def aggregate(**kw: float) -> Aggregate:
    return Aggregate(**{"stale_after_s": 10, "retire_after_s": 100, "max_processes": 100, **kw})


def samples(text: bytes) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, parsed by Prometheus's own parser."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


# --- the registry of one process --------------------------------------------------------------


def test_registry_refuses_what_the_catalog_does_not_define() -> None:
    r = Registry()
    with pytest.raises(ValueError, match="unknown metric"):
        r.inc("haif_no_such_total")
    with pytest.raises(ValueError, match="is a counter"):
        r.set(REQUESTS, OK, 1)
    with pytest.raises(ValueError, match="takes labels"):
        r.inc(REQUESTS, ("echo",))
    with pytest.raises(ValueError, match="cannot decrease"):
        r.inc(REQUESTS, OK, -1)


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    r = Registry()
    name = "haif_inter_token_latency_seconds"
    r.observe(name, ("echo",), ITL_BUCKETS_S[0])  # on the first bound: counted in it
    r.observe(name, ("echo",), ITL_BUCKETS_S[0] * 1.01)
    r.observe(name, ("echo",), 10_000.0, count=3)  # above every bound: +Inf
    h = r.value(name, ("echo",))
    assert isinstance(h, HistogramValue)
    assert h.counts[0] == 1 and h.counts[1] == 1 and h.counts[-1] == 3
    assert h.count == 5
    assert h.sum == pytest.approx(ITL_BUCKETS_S[0] * 2.01 + 30_000.0)


# --- merging the processes ----------------------------------------------------------------------


def test_counters_sum_over_processes_and_never_go_backwards() -> None:
    a, b = Registry(), Registry()
    a.inc(REQUESTS, OK, 3)
    b.inc(REQUESTS, OK, 4)
    agg = aggregate()
    agg.push("gw-1", "gateway", a.snapshot(), now=0)
    agg.push("gw-2", "gateway", b.snapshot(), now=0)
    assert value(agg.render(1), REQUESTS, model="echo", version="1", kind="completion", status="ok") == 7
    # Pushing the same cumulative snapshot again counts nothing twice.
    agg.push("gw-1", "gateway", a.snapshot(), now=2)
    assert value(agg.render(3), REQUESTS, model="echo", version="1", kind="completion", status="ok") == 7
    # gw-2 dies: long past staleness, its requests still count.
    a.inc(REQUESTS, OK, 1)
    agg.push("gw-1", "gateway", a.snapshot(), now=50)
    text = agg.render(50)
    assert value(text, REQUESTS, model="echo", version="1", kind="completion", status="ok") == 8
    assert value(text, "haif_metrics_processes", component="gateway") == 1
    assert agg.by_process(REQUESTS, 50, {"status": "ok"}) == {"gw-1": 4, "gw-2": 4}


def test_gauges_of_silent_processes_are_dropped_and_merge_per_catalog() -> None:
    a, b = Registry(), Registry()
    for r, depth, dlq in ((a, 2, 5), (b, 3, 7)):
        r.set("haif_queue_depth", ("echo",), depth)  # per replica: summed
        r.set("haif_dlq_depth", (), dlq)  # one global fact seen by each: max
        r.set("haif_circuit_state", ("echo", "w0"), 0 if r is a else 2)
    agg = aggregate()
    agg.push("o-1", "orchestrator", a.snapshot(), now=0)
    agg.push("o-2", "orchestrator", b.snapshot(), now=5)
    text = agg.render(6)
    assert value(text, "haif_queue_depth", model="echo") == 5
    assert value(text, "haif_dlq_depth") == 7
    assert value(text, "haif_circuit_state", model="echo", worker="w0") == 2
    text = agg.render(12)  # o-1 silent for 12 s > stale_after_s: its gauges are gone
    assert value(text, "haif_queue_depth", model="echo") == 3
    text = agg.render(30)  # both silent: no series at all, rather than a stale number
    assert value(text, "haif_queue_depth", model="echo") is None
    assert value(text, "haif_metrics_processes", component="orchestrator") is None


def test_retired_processes_are_folded_in_and_their_late_pushes_ignored() -> None:
    a, b = Registry(), Registry()
    a.inc(REQUESTS, OK, 5)
    b.inc(REQUESTS, OK, 1)
    agg = aggregate(retire_after_s=60)
    agg.push("gw-1", "gateway", a.snapshot(), now=0)
    agg.push("gw-2", "gateway", b.snapshot(), now=100)  # gw-1 silent 100 s: retired
    assert agg.by_process(REQUESTS, 100) == {"gw-2": 1}
    assert value(agg.render(100), REQUESTS, model="echo", version="1", kind="completion", status="ok") == 6
    assert agg.push("gw-1", "gateway", a.snapshot(), now=101) is False  # not counted twice
    assert value(agg.render(101), REQUESTS, model="echo", version="1", kind="completion", status="ok") == 6


def test_process_count_is_bounded() -> None:
    agg = aggregate(max_processes=3)
    for i in range(10):
        r = Registry()
        r.inc(REQUESTS, OK, 1)
        agg.push(f"p{i}", "gateway", r.snapshot(), now=float(i))
    assert len(agg.by_process(REQUESTS, 10)) == 3
    assert value(agg.render(10), REQUESTS, model="echo", version="1", kind="completion", status="ok") == 10


def test_a_snapshot_from_another_catalog_is_dropped_not_misrendered() -> None:
    r = Registry()
    r.inc(REQUESTS, OK, 1)
    snap = r.snapshot()
    snap["haif_from_the_future_total"] = {(): 1.0}
    snap["haif_time_to_first_token_seconds"] = {("echo",): HistogramValue((1, 2), 0.5)}
    agg = aggregate()
    agg.push("p", "bridge", snap, now=0)
    parsed = samples(agg.render(0))
    assert (REQUESTS, frozenset({"model": "echo", "version": "1", "kind": "completion", "status": "ok"}.items())) in parsed
    assert not any(name.startswith(("haif_from", "haif_time_to_first")) for name, _ in parsed)


# --- the exposition -----------------------------------------------------------------------------


def test_exposition_is_valid_prometheus_text_for_every_kind() -> None:
    r = Registry()
    tenant = 'acme "quoted" \\ back\nslash'
    r.inc("haif_quota_rejections_total", (tenant, "rate_limit_exceeded"), 2)
    for seconds in (0.02, 0.3, 400.0):
        r.observe("haif_time_to_first_token_seconds", ("echo",), seconds)
    agg = aggregate()
    agg.push("p", "gateway", r.snapshot(), now=0)
    text = agg.render(0)
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    for spec in CATALOG:  # every metric is announced, even before its first sample
        base = spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name
        assert families[base].type == spec.kind, spec.name
        assert families[base].documentation == spec.help
        assert f"# TYPE {spec.name} {spec.kind}".encode() in text
    # label values with quotes, backslashes and newlines survive the round trip
    assert value(text, "haif_quota_rejections_total", tenant=tenant, reason="rate_limit_exceeded") == 2
    buckets = {
        s.labels["le"]: s.value
        for s in families["haif_time_to_first_token_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets["0.01"] == 0 and buckets["0.025"] == 1 and buckets["0.5"] == 2
    assert buckets["30.0"] == 2 and buckets["+Inf"] == 3  # cumulative, +Inf is the count
    assert value(text, "haif_time_to_first_token_seconds_count", model="echo") == 3
    assert value(text, "haif_time_to_first_token_seconds_sum", model="echo") == pytest.approx(400.32)


# --- what the components record ---------------------------------------------------------------


async def test_gateway_counts_requests_tokens_and_quota_rejections(tmp_path: Path, sqlite_db: Database) -> None:
    config = sqlite_config(tmp_path, models=[{"name": "echo", "runtime": "echo"}])
    _, token = make_tenant(sqlite_db, "acme", QuotaLimits(requests_per_minute=2))
    adm = admission(config, sqlite_db)
    metrics = GatewayMetrics(models=["echo"])
    adm.metrics = metrics

    async def run() -> None:
        for _ in range(2):
            ticket = await adm.admit(item(config, token))
            await adm.succeed(ticket, 3, 2, answer("echo", ticket.job_id))
        with pytest.raises(RateLimited):
            await adm.admit(item(config, token))
        with pytest.raises(AuthenticationFailed):
            await adm.admit(item(config, "haif_wrong-but-well-formed-key"))
        with pytest.raises(ModelNotFound):
            await adm.admit(item(config, token, model="tenant-chosen-name"))
        await asyncio.gather(*adm._settling)

    await run()
    snap = metrics.registry.snapshot()
    assert snap[REQUESTS] == {
        OK: 2,
        ("echo", "", "completion", "rate_limit_exceeded"): 1,  # refused before a version was given
        ("echo", "", "completion", "invalid_api_key"): 1,
        ("other", "", "completion", "model_not_found"): 1,  # a client's string never becomes a label
    }
    assert snap["haif_prompt_tokens_total"] == {("echo",): 6}
    assert snap["haif_completion_tokens_total"] == {("echo",): 4}
    assert snap["haif_quota_rejections_total"] == {("acme", "rate_limit_exceeded"): 1}
    assert snap["haif_gateway_admissions_total"][("admitted",)] == 2
    assert metrics.counts["rate_limited"] == 1  # Gateway.stats keeps its per-replica view


def test_orchestrator_samples_workers_and_records_breakers_queues_dlq() -> None:
    process = ProcessMetrics("orchestrator")
    orch = OrchestratorMetrics(process)
    workers = [("echo", "1", "ready", 2), ("echo", "1", "ready", 1), ("echo", "1", "dead", 0),
               ("llm", "1", "loading", 0), ("echo", "2", "draining", 1)]
    orch.watch_workers(lambda: workers)
    orch.queue_depth("echo", 4)
    orch.circuit_state("echo", "echo/r/0", "half_open")
    orch.circuit_state("echo", "echo/r/1", 2)
    orch.dlq_depth(9)
    snap = process.registry.snapshot()
    assert snap["haif_workers"][("echo", "1", "ready")] == 2
    assert snap["haif_workers"][("echo", "1", "dead")] == 1
    assert snap["haif_workers"][("echo", "1", "loading")] == 0  # zero, not missing
    assert snap["haif_workers"][("echo", "2", "draining")] == 1  # a version being drained
    assert snap["haif_workers"][("echo", "2", "ready")] == 0
    assert snap["haif_workers"][("llm", "1", "loading")] == 1
    assert snap["haif_in_flight_requests"] == {("echo",): 4, ("llm",): 0}
    assert snap["haif_queue_depth"] == {("echo",): 4}
    assert snap["haif_circuit_state"] == {("echo", "echo/r/0"): 1, ("echo", "echo/r/1"): 2}
    assert snap["haif_dlq_depth"] == {(): 9}
    orch.forget_worker("echo", "echo/r/1")
    workers.pop(0)  # a worker went away: the next sample says so
    snap = process.registry.snapshot()
    assert snap["haif_circuit_state"] == {("echo", "echo/r/0"): 1}
    assert snap["haif_workers"][("echo", "1", "ready")] == 1
    with pytest.raises(ValueError, match="circuit state"):
        orch.circuit_state("echo", "w", "ajar")


def test_worker_records_in_flight_and_cache_hits() -> None:
    process = ProcessMetrics("worker")
    worker = WorkerMetrics(process, "signed-echo")
    busy = [0]
    worker.watch_in_flight(lambda: busy[0])
    worker.artifact_pulled(hits=0, misses=3)
    worker.artifact_pulled(hits=3, misses=0)
    busy[0] = 2
    snap = process.registry.snapshot()
    assert snap["haif_worker_in_flight_requests"] == {("signed-echo",): 2}
    assert snap["haif_artifact_cache_hits_total"] == {("signed-echo",): 3}
    assert snap["haif_artifact_cache_misses_total"] == {("signed-echo",): 3}


def bridge_app(metrics: BridgeMetrics) -> FastAPI:
    """Wired like haif.bridge.app.build_app: edge middleware, then metrics outermost."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict:
        request.state.model = body.model
        return {"ok": True}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return {"id": model_id}

    app.add_middleware(EdgeMiddleware, max_body_bytes=1024)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def test_bridge_counts_requests_by_route_template_model_and_status() -> None:
    process = ProcessMetrics("bridge")
    client = TestClient(bridge_app(BridgeMetrics(process, ["echo"])))
    assert client.post("/v1/completions", json={"model": "echo", "prompt": "x"}).status_code == 200
    assert client.post("/v1/completions", json={"model": "whatever-1", "prompt": "x"}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 422
    assert client.post("/v1/completions", content=b"x" * 2048).status_code == 413
    assert client.get("/v1/models/some/random/name").status_code == 200
    assert client.get("/nowhere/abc").status_code == 404
    counts = process.registry.snapshot()["haif_http_requests_total"]
    assert counts == {
        ("/v1/completions", "echo", "200"): 1,
        ("/v1/completions", "other", "200"): 1,
        ("/v1/completions", "", "422"): 1,
        ("other", "", "413"): 1,  # refused at the edge, before routing
        ("/v1/models/{model_id:path}", "", "200"): 1,
        ("other", "", "404"): 1,
    }
    latency = process.registry.snapshot()["haif_http_request_duration_seconds"]
    assert latency[("/v1/completions", "echo")].count == 1


# --- configuration and the scrape side -----------------------------------------------------------


def test_metrics_config_is_bounded_and_consistent(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("telemetry: {metrics_push_interval_s: 5, metrics_stale_after_s: 6}\n")
    with pytest.raises(ConfigError, match="twice metrics_push_interval_s"):
        load_config(path, environ={})
    path.write_text("telemetry: {metrics_push_interval_s: 0}\n")
    with pytest.raises(ConfigError, match="metrics_push_interval_s"):
        load_config(path, environ={})
    path.write_text("{}\n")
    config = load_config(path, environ={"HAIF_SERVER__APP_NAME": "prod", "HAIF_RAY__NAMESPACE": "ns"})
    target = MetricsTarget.from_config(config)
    assert (target.actor_name, target.namespace, target.enabled) == ("prod-metrics", "ns", True)


async def test_scrape_without_a_pipeline_is_a_clear_503(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    # A process without Ray (the same pytest process may hold the integration cluster).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(MetricsUnavailable, match="disabled") as info:
        await MetricsReader(MetricsTarget(enabled=False)).render()
    assert info.value.status_code == 503
    with pytest.raises(MetricsUnavailable, match="Ray"):
        await MetricsReader(MetricsTarget(enabled=True)).render()
    # Outside Ray nothing is pushed, and recording still works.
    process = ProcessMetrics.start(MetricsTarget(enabled=True), "bridge")
    assert not process.pushing
    process.registry.inc(REQUESTS, OK)
    assert process.registry.value(REQUESTS, OK) == 1


def test_catalog_names_are_prometheus_conventional() -> None:
    for spec in CATALOG:
        assert spec.name.startswith("haif_")
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec.name
        assert (spec.kind == "histogram") == bool(spec.buckets), spec.name
        assert list(spec.buckets) == sorted(set(spec.buckets)), spec.name
        assert "le" not in spec.labels
    assert len(SPECS) == len(CATALOG)
