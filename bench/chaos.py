"""Resilience under worker kills: success rate and latency with and without chaos.

One run, one Ray cluster, one HAIF deployment on PostgreSQL (tenancy on, so that
Idempotency-Key works): an echo model with two workers, driven by a closed loop of
clients. Phases alternate between calm (no kills) and chaos (a random worker of the
model SIGKILLed every ``--kill-every-s`` seconds; the Orchestrator replaces it), and
between plain requests and requests that carry an Idempotency-Key (which the
Orchestrator may retry on another worker when theirs died mid-request).

Reported per request kind: success rate and p50/p99 latency under chaos against calm.

Run from the repository root: ``python -m bench.chaos``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from typing import Any

import httpx

from bench.common import Row, percentile, print_table, write_results
from bench.overhead import BIG, _bench_database, _tenant_token

BENCH = "chaos"
PORT = 8322
BODY = {"model": "echo", "prompt": " ".join(f"t{i}" for i in range(16)), "max_tokens": 16}


def _config(database_url: str) -> Any:
    from haif.config import HaifConfig

    return HaifConfig.model_validate({
        "server": {"port": PORT, "state_dir": ".haif/bench-chaos", "app_name": "haif-chaos"},
        "auth": {"dev_api_key": "bench-chaos-key-0123456789"},
        "database": {"url": database_url},
        "quotas": {"rate_limit_backend": "database"},
        "resilience": {"health_check_period_s": 0.5},
        # 5 ms per token: a request spends ~80 ms on its worker, so kills hit requests.
        "models": [{"name": "echo", "runtime": "echo", "device": "cpu", "num_cpus": 0.1,
                    "workers": 2, "echo": {"token_delay_ms": 5}}],
    })


async def _phase(url: str, key: str, seconds: float, concurrency: int, idempotent: bool,
                 killer: Any | None, errors: Counter[str]) -> tuple[list[float], int, int]:
    """Latencies (ms) of successes, successes, requests; failures counted by error code."""
    latencies: list[float] = []
    total = 0
    stop = time.monotonic() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal total
        while time.monotonic() < stop:
            headers = {"Authorization": f"Bearer {key}", "X-Request-Timeout": "10"}
            if idempotent:
                headers["Idempotency-Key"] = uuid.uuid4().hex
            started = time.perf_counter()
            total += 1
            try:
                resp = await client.post(url, json=BODY, headers=headers)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            if resp.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors[f"{resp.status_code} {resp.json().get('error', {}).get('code')}"] += 1

    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [asyncio.create_task(user(client)) for _ in range(concurrency)]
        if killer is not None:
            tasks.append(asyncio.create_task(killer(stop)))
        await asyncio.gather(*tasks)
    return latencies, len(latencies), total


def _killer(orchestrator: Any, every_s: float, kills: list[str]) -> Any:
    async def run(stop: float) -> None:
        rng = random.Random(7)
        while time.monotonic() + every_s < stop:
            await asyncio.sleep(every_s)
            workers = await asyncio.to_thread(lambda: orchestrator.workers_info.remote("echo").result())
            ready = [w for w in workers if w["state"] == "ready"]
            if ready:
                victim = rng.choice(ready)
                os.kill(victim["pid"], signal.SIGKILL)
                kills.append(victim["worker_id"])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-every-s", type=float, default=3.0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from haif.ingress import wait_ready
    from serve_app import deploy

    base = f"http://127.0.0.1:{PORT}"
    url = f"{base}/v1/completions"
    ray.init(address="local", namespace="haif-bench-chaos", include_dashboard=False, log_to_driver=False)
    data: dict[tuple[str, str], dict[str, Any]] = {}
    kills: list[str] = []
    with _bench_database() as database_url:
        try:
            config = deploy(_config(database_url))
            key = _tenant_token(config, "bench", requests_per_minute=BIG, tokens_per_minute=BIG)
            wait_ready(base, timeout_s=300)
            httpx.post(url, json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=60).raise_for_status()
            orchestrator = serve.get_deployment_handle("Orchestrator", app_name=config.server.app_name)
            for _ in range(args.rounds):
                for kind in ("plain", "idempotent"):
                    for mode in ("calm", "chaos"):
                        killer = _killer(orchestrator, args.kill_every_s, kills) if mode == "chaos" else None
                        errors: Counter[str] = Counter()
                        lat, ok, total = asyncio.run(_phase(
                            url, key, args.seconds, args.concurrency, kind == "idempotent", killer, errors
                        ))
                        slot = data.setdefault((kind, mode), {"lat": [], "ok": 0, "total": 0,
                                                              "errors": Counter()})
                        slot["lat"] += lat
                        slot["ok"] += ok
                        slot["total"] += total
                        slot["errors"].update(errors)
            replacements = orchestrator.status.remote().result()["replacements"]
        finally:
            serve.shutdown()
            ray.shutdown()

    rows: list[Row] = []
    for kind in ("plain", "idempotent"):
        calm, chaos = data[(kind, "calm")], data[(kind, "chaos")]
        label = f"{kind}, kill every {args.kill_every_s:g}s"
        rows += [
            Row(BENCH, f"success rate % ({label})", 100 * chaos["ok"] / chaos["total"],
                100 * calm["ok"] / calm["total"], "same load, no kills", True,
                ">= 99% idempotent" if kind == "idempotent" else ""),
            Row(BENCH, f"latency p50 ms ({label})", percentile(chaos["lat"], 50),
                percentile(calm["lat"], 50), "same load, no kills", False),
            Row(BENCH, f"latency p99 ms ({label})", percentile(chaos["lat"], 99),
                percentile(calm["lat"], 99), "same load, no kills", False),
        ]
    print_table(
        f"chaos: echo, 2 workers, c={args.concurrency}, {args.rounds}x{args.seconds:g}s per phase; "
        f"{len(kills)} workers killed, {replacements} replaced",
        rows,
    )
    for (kind, mode), slot in data.items():
        if slot["errors"]:
            print(f"  failures ({kind}, {mode}): {dict(slot['errors'])}")
    path = write_results(BENCH, rows)
    print(f"\nwrote {path}")
    print(json.dumps([r.to_json() for r in rows]))


if __name__ == "__main__":
    main()
