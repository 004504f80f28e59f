"""GET /metrics: one Prometheus view of every replica and worker of the deployment.

The shared deployment (tests/configs/integration.yaml) runs two Gateway replicas: a
counter that only one of them could see would come out short.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from tests.support.deployment import Deployment, haif_cli
from tests.support.metrics import scrape, total
from tests.support.waiting import wait_for

N = 40
DEADLINE_S = 30
OK_ECHO = {"model": "echo", "kind": "completion", "status": "ok"}
PUSH_INTERVAL_S = 1.0  # telemetry.metrics_push_interval_s (the default) of the deployment


def aggregator():  # noqa: ANN201
    import ray

    return ray.get_actor("haif-metrics", namespace="haif")


def gateway_counts() -> dict[str, float]:
    counts = aggregator().by_process.remote("haif_requests_total", OK_ECHO)
    import ray

    return {p: v for p, v in ray.get(counts, timeout=30).items() if p.startswith("gateway-")}


async def burst(haif: Deployment, n: int) -> list[int]:
    # Concurrent, so that Serve spreads them over both Gateway replicas.
    async with httpx.AsyncClient(base_url=haif.url, headers=haif.headers(), timeout=60) as client:
        async def one(i: int) -> int:
            body = {"model": "echo", "prompt": f"count me {i}", "max_tokens": 3}
            return (await client.post("/v1/completions", json=body)).status_code

        return await asyncio.gather(*(one(i) for i in range(n)))


def settled_scrape(http: httpx.Client, *series: tuple[str, dict[str, str]]) -> dict:
    """A scrape in which earlier tests' requests are all counted: processes push on their
    own beat (1 s), so the counters must hold still across a few push intervals first."""
    last: tuple[float, ...] | None = None
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        now = scrape(http)
        totals = tuple(total(now, name, **labels) for name, labels in series)
        if totals == last:
            return now
        last = totals
        time.sleep(3 * PUSH_INTERVAL_S)
    raise AssertionError(f"the counters {series} kept moving for {DEADLINE_S}s")


def test_request_counter_sums_both_gateway_replicas(http: httpx.Client, haif: Deployment) -> None:
    route = {"endpoint": "/v1/completions", "model": "echo"}
    before = settled_scrape(http, ("haif_requests_total", OK_ECHO), ("haif_http_requests_total", route))
    per_gateway_before = gateway_counts()
    statuses = asyncio.run(burst(haif, N))
    assert statuses == [200] * N

    def counted() -> dict | None:
        now = scrape(http)
        got = total(now, "haif_requests_total", **OK_ECHO) - total(before, "haif_requests_total", **OK_ECHO)
        # Each process pushes on its own beat: wait for the Bridge's too.
        bridge = total(now, "haif_http_requests_total", status="200", **route) - total(
            before, "haif_http_requests_total", status="200", **route
        )
        seen.append((got, bridge))
        return now if got == N and bridge == N else None

    seen: list[tuple[float, float]] = []
    try:
        after = wait_for(counted, DEADLINE_S, 0.25, f"{N} more echo requests in /metrics")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (gateway, bridge) counts seen last: {seen[-3:]}") from None
    # Both Gateway replicas served some: a view of either one alone would be short of N.
    gained = {p: v - per_gateway_before.get(p, 0) for p, v in gateway_counts().items()}
    assert sum(gained.values()) == N, gained
    assert sum(1 for v in gained.values() if v > 0) == 2, gained
    # The Bridge timed them (and counted them with their route, model and status, above).
    timed = total(after, "haif_http_request_duration_seconds_count", **route) - total(
        before, "haif_http_request_duration_seconds_count", **route
    )
    assert timed == N
    tokens = total(after, "haif_completion_tokens_total", model="echo") - total(
        before, "haif_completion_tokens_total", model="echo"
    )
    assert tokens > 0


def test_streams_record_time_to_first_token_and_inter_token_latency(
    http: httpx.Client, auth: dict
) -> None:
    before = scrape(http)
    # echo-slow waits 50 ms per token: the tokens leave the worker one by one.
    body = {"model": "echo-slow", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}
    with http.stream("POST", "/v1/chat/completions", headers=auth, json=body) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 4

    def recorded() -> dict | None:
        now = scrape(http)
        first = total(now, "haif_time_to_first_token_seconds_count", model="echo-slow") - total(
            before, "haif_time_to_first_token_seconds_count", model="echo-slow"
        )
        gaps = total(now, "haif_inter_token_latency_seconds_count", model="echo-slow") - total(
            before, "haif_inter_token_latency_seconds_count", model="echo-slow"
        )
        return now if first == 1 and gaps >= 2 else None

    now = wait_for(recorded, DEADLINE_S, 0.25, "TTFT and ITL of one stream")
    first_s = total(now, "haif_time_to_first_token_seconds_sum", model="echo-slow") - total(
        before, "haif_time_to_first_token_seconds_sum", model="echo-slow"
    )
    assert 0 < first_s < 60


def test_gauges_cover_workers_and_every_process(http: httpx.Client, haif: Deployment) -> None:
    def ready() -> dict | None:
        now = scrape(http)
        processes = {labels["component"]: v for labels, v in now.get("haif_metrics_processes", [])}
        good = (
            total(now, "haif_workers", model="echo", state="ready") == 2
            and total(now, "haif_workers", model="gpu-echo", state="ready") == 2
            and processes.get("gateway") == 2  # each serves HTTP too: no Bridge process
            and "bridge" not in processes
            and processes.get("orchestrator") == 2  # the leader counts the workers, once
            and processes.get("worker", 0) >= 10
            # idle now, and reported (the workers' own counts, as their last probe saw them)
            and ({"model": "echo"}, 0.0) in now.get("haif_in_flight_requests", [])
        )
        return now if good else None

    now = wait_for(ready, DEADLINE_S, 0.5, "workers and processes in /metrics")
    assert total(now, "haif_workers", model="echo", state="dead") == 0
    assert any(labels == {"model": "echo"} for labels, _ in now["haif_worker_in_flight_requests"])
    # Two signed-echo workers pulled their artifact through the node cache.
    blobs = total(now, "haif_artifact_cache_hits_total", model="signed-echo") + total(
        now, "haif_artifact_cache_misses_total", model="signed-echo"
    )
    assert blobs >= 2


def test_quota_rejections_are_counted_per_tenant(
    http: httpx.Client, haif: Deployment, store_env: dict[str, str]
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    haif_cli(store_env, "tenants", "create", tenant, "--requests-per-minute", "1")
    token = haif_cli(store_env, "tokens", "create", "--tenant", tenant).strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": "echo", "prompt": "x", "max_tokens": 1}
    codes = [http.post("/v1/completions", headers=headers, json=body).status_code for _ in range(3)]
    assert codes == [200, 429, 429]
    wait_for(
        lambda: total(scrape(http), "haif_quota_rejections_total", tenant=tenant,
                      reason="rate_limit_exceeded") == 2,
        DEADLINE_S, 0.25, f"2 quota rejections of {tenant}",
    )


def test_metrics_needs_no_api_key(http: httpx.Client) -> None:
    resp = http.get("/metrics")  # no Authorization header: a Prometheus scrape
    assert resp.status_code == 200
    assert "# TYPE haif_requests_total counter" in resp.text
