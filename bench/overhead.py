"""Platform overhead: the echo model through HAIF's full HTTP path vs a bare Ray Serve app.

Both apps run on one Ray cluster behind the same Serve HTTP proxy, in this script:

* HAIF: HTTP proxy → Bridge (FastAPI) → Gateway → Orchestrator → worker actor (echo);
* baseline: HTTP proxy → one Serve deployment that returns the same response bytes.

Rounds alternate between the two so that drift on a shared machine hits both alike.
Reported: p50/p99 latency at concurrency 1, requests/s at concurrency 32, and ratios.

Run from the repository root: ``python -m bench.overhead``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from bench.common import Row, median, percentile, print_table, write_results

BENCH = "overhead"
PORT = 8321
API_KEY = "bench-key-0123456789abcdef"
BODY = {"model": "echo", "prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 16}


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


def _haif_config() -> Any:
    from haif.config import AuthConfig, HaifConfig, ModelConfig, ServerConfig

    return HaifConfig(
        server=ServerConfig(port=PORT, state_dir=".haif/bench"),
        auth=AuthConfig(dev_api_key=API_KEY),
        models=[ModelConfig(name="echo", runtime="echo", device="cpu", num_cpus=0.1)],
    )


async def _latencies(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        resp = await client.post(url, json=BODY)
        out.append((time.perf_counter() - start) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:200]}")
    return out


async def _throughput(client: httpx.AsyncClient, url: str, concurrency: int, total: int) -> float:
    queue = iter(range(total))
    errors = 0

    async def user() -> None:
        nonlocal errors
        for _ in queue:
            resp = await client.post(url, json=BODY)
            errors += resp.status_code != 200

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{url}: {errors} failed requests")
    return total / elapsed


async def _measure(rounds: int, n_latency: int, n_throughput: int, concurrency: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{PORT}"
    targets = {"haif": f"{base}/v1/completions", "bare": f"{base}/bare"}
    lat: dict[str, list[float]] = {k: [] for k in targets}
    rps: dict[str, list[float]] = {k: [] for k in targets}
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:
        for name, url in targets.items():  # warm-up
            await _latencies(client, url, 30)
            await _throughput(client, url, concurrency, concurrency * 4)
        for _ in range(rounds):
            for name, url in targets.items():
                lat[name] += await _latencies(client, url, n_latency)
                rps[name].append(await _throughput(client, url, concurrency, n_throughput))
    return {"lat": lat, "rps": rps}


def _breakdown(limits: Any, n: int = 200) -> dict[str, float]:
    """Where HAIF's time goes, hop by hop, measured from this driver (p50, ms)."""
    from ray import serve

    from haif.envelope import RequestContext, build_work_item
    from haif.protocol import CompletionRequest

    gateway = serve.get_deployment_handle("Gateway", app_name="haif")
    orchestrator = serve.get_deployment_handle("Orchestrator", app_name="haif")
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
        "HTTP GET /healthz (proxy + Bridge, no hop)": p50(lambda: http.get(f"{base}/healthz")),
        "HTTP POST /bare (proxy + body + 1 replica)": p50(lambda: http.post(f"{base}/bare", json=BODY)),
        "HTTP POST /v1/completions (full path)": p50(lambda: http.post(f"{base}/v1/completions", json=BODY)),
        "handle: Orchestrator.models (1 Serve hop)": p50(lambda: orchestrator.models.remote().result()),
        "handle: Orchestrator.generate (hop + actor)": p50(lambda: orchestrator.generate.remote(item()).result()),
        "handle: Gateway.generate (2 hops + actor)": p50(lambda: gateway.generate.remote(item()).result()),
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

    from haif.cli.serve import wait_ready
    from serve_app import deploy

    ray.init(namespace="haif-bench", include_dashboard=False, log_to_driver=False)
    try:
        config = deploy(_haif_config())
        wait_ready(f"http://127.0.0.1:{PORT}", timeout_s=300)
        # The bare app answers with exactly HAIF's bytes for the same request.
        probe = httpx.post(
            f"http://127.0.0.1:{PORT}/v1/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        probe.raise_for_status()
        serve.run(_bare_app(probe.content), name="bare", route_prefix="/bare")
        data = asyncio.run(
            _measure(args.rounds, args.latency_requests, args.throughput_requests, args.concurrency)
        )
        breakdown = _breakdown(config.limits)
    finally:
        serve.shutdown()
        ray.shutdown()

    lat, rps = data["lat"], data["rps"]
    rows = [
        Row(BENCH, "latency p50 ms (c=1)", percentile(lat["haif"], 50), percentile(lat["bare"], 50),
            "bare Ray Serve deployment", False, "<= 1.5x"),
        Row(BENCH, "latency p99 ms (c=1)", percentile(lat["haif"], 99), percentile(lat["bare"], 99),
            "bare Ray Serve deployment", False),
        Row(BENCH, f"requests/s (c={args.concurrency})", median(rps["haif"]), median(rps["bare"]),
            "bare Ray Serve deployment", True, ">= 0.7x"),
    ]
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
