"""Platform overhead: the echo model through HAIF's full HTTP path vs a bare Ray Serve app.

The apps run on one Ray cluster behind the same Serve HTTP proxy, in this script:

* HAIF: HTTP proxy → Gateway (its FastAPI ingress, admission, router) → worker actor
  (echo), without tenancy (``auth.backend: static``: one key, no quotas, no job records);
* HAIF on PostgreSQL (route ``/pg``): the same path with tenancy — API token lookup
  (cached), quota reservation before dispatch and settlement after it, for a tenant
  with requests- and tokens-per-minute limits counted in PostgreSQL;
* HAIF on PostgreSQL with a concurrency limit (route ``/pgc``): settlement is then
  awaited before the answer (the slot must be free for the client's next request);
* HAIF with tracing on (route ``/otel``): the no-tenancy path with every process
  exporting its spans over OTLP/HTTP to a receiver on loopback, in a process of its own
  as a collector would be (the ``haif`` app, tracing off, is its baseline);
* baseline: HTTP proxy → one Serve deployment that returns the same response bytes.

Latency requests go to each target in turn, one by one, and throughput rounds alternate
between them, so that drift on a shared machine hits all alike.
Reported: p50/p99 latency at concurrency 1, requests/s at concurrency 32, and ratios;
for tenancy, the p50 it adds to the no-tenancy path, and the cost of the two database
writes of a request (reservation, settlement) measured alone.

Run from the repository root: ``python -m bench.overhead``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from bench.common import Row, median, percentile, print_table, round_ratios, write_results

if TYPE_CHECKING:
    from collections.abc import Iterator

BENCH = "overhead"
PORT = 8321
API_KEY = "bench-key-0123456789abcdef"
BODY = {"model": "echo", "prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 16}
PG_SERVER = os.environ.get("HAIF_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BIG = 10**9  # limits that are counted, never reached


def _bare_app(response_bytes: bytes) -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(name="Bare", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    class Bare:
        def __init__(self, payload: bytes) -> None:
            self._payload = payload

        async def __call__(self, request: Request) -> Response:
            await request.body()
            return Response(self._payload, media_type="application/json")

    return Bare.bind(response_bytes)


def _haif_config(
    app_name: str = "haif", database_url: str | None = None, otlp_endpoint: str | None = None
) -> Any:
    from haif.config import HaifConfig

    data: dict[str, Any] = {
        "server": {"port": PORT, "state_dir": ".haif/bench", "app_name": app_name},
        "auth": {"dev_api_key": API_KEY, "backend": "static"},
        "models": [{"name": "echo", "runtime": "echo", "device": "cpu", "num_cpus": 0.1}],
    }
    if otlp_endpoint is not None:
        data["telemetry"] = {"otlp_endpoint": otlp_endpoint}
    if database_url is not None:
        data["auth"]["backend"] = "database"
        data["database"] = {"url": database_url}
        data["quotas"] = {"rate_limit_backend": "database"}
    return HaifConfig.model_validate(data)


@contextmanager
def _bench_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(PG_SERVER)
    name = f"haif_bench_{uuid.uuid4().hex[:8]}"

    def admin() -> Any:
        return psycopg.connect(host=server.host, port=server.port or 5432, user=server.username,
                               password=server.password, dbname=server.database, autocommit=True)

    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _tenant_token(config: Any, name: str, **limits: int) -> str:
    """A tenant with ``limits`` and an API token of it, made with the store's own API."""
    from haif.store import open_database
    from haif.store.quotas import QuotaLimits
    from haif.store.tenants import TenantRepository
    from haif.store.tokens import TokenRepository

    db = open_database(config, migrate=True, pool_size=1)
    try:
        with db.session() as session:
            tenant = TenantRepository(session).create(name, QuotaLimits(**limits))
            _, token = TokenRepository(session).create(tenant)
        return token
    finally:
        db.close()


def _write_costs(config: Any, n: int = 300) -> dict[str, float]:
    """p50 ms of the two writes of a request on PostgreSQL, alone (no HTTP, no Ray), made
    as the Gateway makes them: single statements from an event loop."""
    from datetime import UTC, datetime

    from haif.store import open_database
    from haif.store.aio import AsyncWrites
    from haif.store.ledger import JobRequest, Outcome
    from haif.store.models import JobState
    from haif.store.quotas import QuotaLimits
    from haif.store.tenants import TenantRepository

    db = open_database(config, pool_size=1)
    limits = QuotaLimits(requests_per_minute=BIG, tokens_per_minute=BIG)
    with db.session() as session:
        tenant_id = TenantRepository(session).create("bench-writes", limits).id
    db.close()
    writes = AsyncWrites.from_config(config)
    reserve_ms: list[float] = []
    settle_ms: list[float] = []

    async def run() -> None:
        for i in range(n):
            req = JobRequest(job_id=f"cmpl-{uuid.uuid4().hex}", tenant_id=tenant_id, token_id=None,
                             kind="completion", model="echo", version="1", tokens=30, limits=limits,
                             count_requests=True)
            start = time.perf_counter()
            res = await writes.reserve(req, datetime.now(UTC))
            mid = time.perf_counter()
            now = datetime.now(UTC)
            await writes.settle(res, Outcome(JobState.SUCCEEDED, 9, 16, now, now, bill=True))
            if i >= 20:  # warm-up: connections, prepared statements
                reserve_ms.append((mid - start) * 1000)
                settle_ms.append((time.perf_counter() - mid) * 1000)
        await writes.close()

    asyncio.run(run())
    return {
        "PostgreSQL reservation (1 statement, from the event loop)": percentile(reserve_ms, 50),
        "PostgreSQL settlement (1 statement, from the event loop)": percentile(settle_ms, 50),
    }


async def _latencies(client: httpx.AsyncClient, url: str, n: int, headers: dict[str, str]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        resp = await client.post(url, json=BODY, headers=headers)
        out.append((time.perf_counter() - start) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:200]}")
    return out


async def _throughput(
    client: httpx.AsyncClient, url: str, concurrency: int, total: int, headers: dict[str, str]
) -> float:
    queue = iter(range(total))
    errors = 0

    async def user() -> None:
        nonlocal errors
        for _ in queue:
            resp = await client.post(url, json=BODY, headers=headers)
            errors += resp.status_code != 200

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{url}: {errors} failed requests")
    return total / elapsed


async def _measure(
    targets: dict[str, tuple[str, str]], rounds: int, n_latency: int, n_throughput: int, concurrency: int
) -> dict[str, Any]:
    """``targets``: name → (url, API key)."""
    lat: dict[str, list[float]] = {k: [] for k in targets}
    round_p50: dict[str, list[float]] = {k: [] for k in targets}
    rps: dict[str, list[float]] = {k: [] for k in targets}
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for url, key in targets.values():  # warm-up
            headers = {"Authorization": f"Bearer {key}"}
            await _latencies(client, url, 30, headers)
            await _throughput(client, url, concurrency, concurrency * 4, headers)
        for _ in range(rounds):
            # Latency: one request to each target in turn, so that the machine's drift
            # (seconds long on a shared host) falls on every target alike.
            this_round: dict[str, list[float]] = {k: [] for k in targets}
            for _ in range(n_latency):
                for name, (url, key) in targets.items():
                    headers = {"Authorization": f"Bearer {key}"}
                    this_round[name] += await _latencies(client, url, 1, headers)
            for name, values in this_round.items():
                lat[name] += values
                round_p50[name].append(percentile(values, 50))
            for name, (url, key) in targets.items():
                headers = {"Authorization": f"Bearer {key}"}
                rps[name].append(await _throughput(client, url, concurrency, n_throughput, headers))
    return {"lat": lat, "rps": rps, "round_p50": round_p50}


def _breakdown(limits: Any, n: int = 200) -> dict[str, float]:
    """Where HAIF's time goes, hop by hop, measured from this driver (p50, ms)."""
    from ray import serve

    from haif.envelope import RequestContext, build_work_item
    from haif.protocol import CompletionRequest

    gateway = serve.get_deployment_handle("Gateway", app_name="haif")
    body = CompletionRequest(**BODY)

    def item() -> Any:
        ctx = RequestContext.new(timeout_s=30, api_key=API_KEY)
        return build_work_item("completion", body, ctx, limits)

    def p50(fn: Any) -> float:
        for _ in range(20):
            fn()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1000)
        return percentile(samples, 50)

    http = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"})
    base = f"http://127.0.0.1:{PORT}"
    return {
        "HTTP GET /healthz (proxy + Gateway, no worker)": p50(lambda: http.get(f"{base}/healthz")),
        "HTTP POST /bare (proxy + body + 1 replica)": p50(lambda: http.post(f"{base}/bare", json=BODY)),
        "HTTP POST /v1/completions (full path)": p50(lambda: http.post(f"{base}/v1/completions", json=BODY)),
        "handle: Gateway.limits (1 Serve hop)": p50(lambda: gateway.limits.remote().result()),
        "handle: Gateway.generate (1 hop + actor)": p50(lambda: gateway.generate.remote(item()).result()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--throughput-requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    import ray
    from ray import serve

    from haif.bootstrap import prepare
    from haif.ingress import wait_ready
    from serve_app import build_app, deploy
    from tests.support.otlp import ReceiverProcess

    base = f"http://127.0.0.1:{PORT}"
    # A cluster of our own ("local"), never one that happens to run on this machine.
    ray.init(address="local", namespace="haif-bench", include_dashboard=False, log_to_driver=False)
    # Counts what it receives without decoding it: the exporters' cost is what is measured.
    # In a process of its own, as a collector is: here it would take this client's GIL.
    with _bench_database() as database_url, ReceiverProcess() as otlp:
        try:
            config = deploy(_haif_config())
            serve.run(build_app(prepare(_haif_config("haif-otel", otlp_endpoint=otlp.endpoint))),
                      name="haif-otel", route_prefix="/otel")
            pg_config = prepare(_haif_config("haif-pg", database_url))
            pg_key = _tenant_token(pg_config, "bench", requests_per_minute=BIG, tokens_per_minute=BIG)
            pgc_key = _tenant_token(pg_config, "bench-c", requests_per_minute=BIG, tokens_per_minute=BIG,
                                    max_concurrent=10_000)
            serve.run(build_app(pg_config), name="haif-pg", route_prefix="/pg")
            wait_ready(base, timeout_s=300)
            # The bare app answers with exactly HAIF's bytes for the same request.
            probe = httpx.post(
                f"{base}/v1/completions", json=BODY, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
            )
            probe.raise_for_status()
            for key in (pg_key, pgc_key):
                httpx.post(f"{base}/pg/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"},
                           timeout=120).raise_for_status()
            httpx.post(f"{base}/otel/v1/completions", json=BODY, headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=120).raise_for_status()
            serve.run(_bare_app(probe.content), name="bare", route_prefix="/bare")
            targets = {
                "haif": (f"{base}/v1/completions", API_KEY),
                "pg": (f"{base}/pg/v1/completions", pg_key),
                "pgc": (f"{base}/pg/v1/completions", pgc_key),
                "otel": (f"{base}/otel/v1/completions", API_KEY),
                "bare": (f"{base}/bare", API_KEY),
            }
            data = asyncio.run(
                _measure(targets, args.rounds, args.latency_requests, args.throughput_requests, args.concurrency)
            )
            breakdown = _breakdown(config.limits)
            breakdown.update(_write_costs(pg_config))
        finally:
            serve.shutdown()
            ray.shutdown()

    lat, rps, round_p50 = data["lat"], data["rps"], data["round_p50"]
    p50 = {name: percentile(values, 50) for name, values in lat.items()}
    no_tenancy = "HAIF without tenancy (static key)"
    rows = [
        Row(BENCH, "latency p50 ms (c=1)", percentile(lat["haif"], 50), percentile(lat["bare"], 50),
            "bare Ray Serve deployment", False, "<= 1.25x", round_ratios(round_p50["haif"], round_p50["bare"])),
        Row(BENCH, "latency p99 ms (c=1)", percentile(lat["haif"], 99), percentile(lat["bare"], 99),
            "bare Ray Serve deployment", False),
        Row(BENCH, f"requests/s (c={args.concurrency})", median(rps["haif"]), median(rps["bare"]),
            "bare Ray Serve deployment", True, ">= 0.85x", round_ratios(rps["haif"], rps["bare"])),
        Row(BENCH, "latency p50 ms (c=1), auth + quota on PostgreSQL", p50["pg"], p50["haif"],
            no_tenancy, False, "<= +2 ms"),
        # No target: a concurrency limit is exact only with its reservation and its
        # settlement both on the request's path (no lease; see the README).
        Row(BENCH, "latency p50 ms (c=1), auth + quota + concurrency on PostgreSQL", p50["pgc"], p50["haif"],
            no_tenancy, False),
        Row(BENCH, f"requests/s (c={args.concurrency}), auth + quota on PostgreSQL", median(rps["pg"]),
            median(rps["haif"]), no_tenancy, True),
    ]
    rows += [
        Row(BENCH, "latency p50 ms (c=1), tracing on (OTLP/HTTP to loopback)", p50["otel"], p50["haif"],
            "HAIF, tracing off", False, "<= 1.05x"),
        Row(BENCH, f"requests/s (c={args.concurrency}), tracing on (OTLP/HTTP to loopback)",
            median(rps["otel"]), median(rps["haif"]), "HAIF, tracing off", True),
    ]
    breakdown["added p50 ms: tracing on (OTLP/HTTP to loopback)"] = p50["otel"] - p50["haif"]
    breakdown["OTLP export requests received (tracing on)"] = float(otlp.requests)
    breakdown["added p50 ms: auth + quota on PostgreSQL"] = p50["pg"] - p50["haif"]
    breakdown["added p50 ms: auth + quota + concurrency on PostgreSQL"] = p50["pgc"] - p50["haif"]
    print_table(f"overhead: echo through HAIF vs bare Serve ({config.server.app_name}, {args.rounds} rounds)", rows)
    print("\nwhere the time goes (p50 ms, sequential, from the benchmark driver)")
    for name, value in breakdown.items():
        print(f"  {name:<48} {value:8.2f}")
    (path := write_results(BENCH, rows)).with_name("overhead_breakdown.json").write_text(
        json.dumps(breakdown, indent=2) + "\n"
    )
    print(f"\nwrote {path}")
    print(json.dumps([r.to_json() for r in rows]))


if __name__ == "__main__":
    main()
