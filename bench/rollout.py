"""Rollouts and elastic fleets: what a traffic split costs a request, and how long the
first request to a model scaled to zero takes.

One Ray cluster, one HAIF deployment (static key, a PostgreSQL metadata store for the
rollout rows), in this script:

* split vs one version: two echo models with two workers each, ``split`` with a rollout
  at 50/50 (versions 1 and 2 side by side: four workers), ``one`` with its config version
  alone; latency at concurrency 1, one request to each in turn, interleaved rounds.
  Target: p50 <= 1.05x.
* scale from zero vs a cold start: ``tiny-llama`` (the torch runtime, from a signed
  artifact) with ``autoscaling.min_workers: 0``: once it has scaled to zero, the time of
  its first request (a worker started, the artifact taken from the warm node cache and
  verified, loaded, the request served) against a cold start of the same model measured
  in the same run (a worker actor started on an empty node cache: pulled, verified,
  loaded, then the same request: what a fresh ``make serve`` does for a model). Rounds
  alternate. Target: <= 1.5x.

Run from the repository root: ``python -m bench.rollout``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Row, median, percentile, print_table, round_ratios, write_results
from bench.overhead import _bench_database

BENCH = "rollout"
PORT = 8331
API_KEY = "bench-key-0123456789abcdef"
BODY = {"prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 16}
LLAMA_BODY = {"model": "tiny-llama", "prompt": "The lighthouse", "max_tokens": 8, "temperature": 0}
DOWNSCALE_S = 2.0


def _config(root: Path, database_url: str) -> Any:
    from haif.config import HaifConfig

    echo = {"runtime": "echo", "device": "cpu", "num_cpus": 0.1, "workers": 2}
    return HaifConfig.model_validate({
        "server": {"port": PORT, "state_dir": str(root / "state"), "app_name": "haif"},
        "auth": {"dev_api_key": API_KEY, "backend": "static"},
        "database": {"url": database_url},
        "rollouts": {"poll_s": 0.25},
        "models": [
            {"name": "one", **echo},
            {"name": "split", **echo},
            {"name": "tiny-llama", "runtime": "torch", "artifact": "tiny-llama:1", "device": "cpu",
             "num_cpus": 0.5, "max_model_len": 512, "drain_timeout_s": 5,
             "autoscaling": {"min_workers": 0, "max_workers": 1, "downscale_delay_s": DOWNSCALE_S,
                             "upscale_delay_s": 0, "metrics_interval_s": 0.25}},
        ],
        "artifacts": {
            "replicas": [str(root / "replica-1"), str(root / "replica-2"), str(root / "replica-3")],
            "cache_dir": str(root / "cache"),
            "dev_signing_key": str(root / "keys" / "dev.key"),
            "dev_publish": [{"artifact": "tiny-llama:1", "source": ".haif/models/tiny-llama",
                             "build": "tiny-llama", "runtime": "torch"}],
        },
    })


def _set_rollout(config: Any) -> None:
    from haif.store import open_database
    from haif.store.rollouts import RolloutRepository

    db = open_database(config, pool_size=1)
    try:
        with db.session() as session:
            RolloutRepository(session).set("split", "1", "2", 50)
    finally:
        db.close()


def _status(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/readyz", timeout=10).json()["models"]


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


async def _latency(base: str, rounds: int, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]], set]:
    lat: dict[str, list[float]] = {"split": [], "one": []}
    round_p50: dict[str, list[float]] = {"split": [], "one": []}
    versions: set[str] = set()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
        for model in lat:  # warm-up
            for _ in range(30):
                (await http.post("/v1/completions", json={**BODY, "model": model})).raise_for_status()
        for _ in range(rounds):
            this: dict[str, list[float]] = {k: [] for k in lat}
            for _ in range(n):
                for model in lat:
                    start = time.perf_counter()
                    resp = await http.post("/v1/completions", json={**BODY, "model": model})
                    this[model].append((time.perf_counter() - start) * 1000)
                    resp.raise_for_status()
                    if model == "split":
                        versions.add(resp.json()["system_fingerprint"])
            for model, values in this.items():
                lat[model] += values
                round_p50[model].append(percentile(values, 50))
    return lat, round_p50, versions


def _from_zero(base: str) -> float:
    """Seconds of the first request to tiny-llama once it has scaled to zero."""
    _wait(lambda: _status(base)["tiny-llama"]["workers"] == 0, 120, "tiny-llama to scale to zero")
    start = time.perf_counter()
    resp = httpx.post(f"{base}/v1/completions", json=LLAMA_BODY,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    resp.raise_for_status()
    return time.perf_counter() - start


def _cold_start(config: Any, root: Path, round_no: int) -> float:
    """Seconds from a new worker actor on an empty node cache to the answer of the same request."""
    import ray

    from actors.worker import ModelWorker
    from haif.envelope import RequestContext, build_work_item
    from haif.protocol import CompletionRequest

    model = config.model("tiny-llama")
    artifacts = config.artifacts.model_copy(update={"cache_dir": str(root / f"cold-cache-{round_no}")})
    start = time.perf_counter()
    worker = ray.remote(ModelWorker).options(num_cpus=model.num_cpus, max_concurrency=model.max_concurrency).remote(
        model, config.limits.max_prompt_tokens, str(Path.cwd()), f"cold/{round_no}", artifacts,
    )
    try:
        ray.get(worker.load.remote())
        ctx = RequestContext.new(timeout_s=120, api_key=None)
        item = build_work_item("completion", CompletionRequest(**LLAMA_BODY), ctx, config.limits)
        ray.get(worker.generate.remote(item))
        return time.perf_counter() - start
    finally:
        ray.kill(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--zero-rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    from haif.bootstrap import prepare
    from haif.ingress import wait_ready
    from serve_app import deploy

    base = f"http://127.0.0.1:{PORT}"
    ray.init(address="local", namespace="haif-bench", include_dashboard=False, log_to_driver=False)
    with _bench_database() as database_url, tempfile.TemporaryDirectory(prefix="haif-bench-rollout-") as tmp:
        root = Path(tmp)
        try:
            config = prepare(_config(root, database_url))
            _set_rollout(config)
            deploy(config)
            wait_ready(base, timeout_s=600)
            _wait(lambda: _status(base)["split"]["weights"] == {"1": 50, "2": 50}, 120, "the 50/50 split")
            lat, round_p50, versions = asyncio.run(_latency(base, args.rounds, args.latency_requests))
            zero, cold = [], []
            _from_zero(base)  # its first start fills the node cache: from then on it is warm
            for i in range(args.zero_rounds):  # alternate: drift falls on both alike
                cold.append(_cold_start(config, root, i))
                zero.append(_from_zero(base))
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    assert versions == {"split:1", "split:2"}, versions
    rows = [
        Row(BENCH, "rollout 50/50 latency p50 ms (c=1)", percentile(lat["split"], 50), percentile(lat["one"], 50),
            "the same model, one version", False, "<= 1.05x", round_ratios(round_p50["split"], round_p50["one"])),
        Row(BENCH, "rollout 50/50 latency p99 ms (c=1)", percentile(lat["split"], 99), percentile(lat["one"], 99),
            "the same model, one version", False),
        Row(BENCH, "scale-from-zero first request s", median(zero), median(cold),
            "cold model start (empty node cache)", False, "<= 1.5x", round_ratios(zero, cold)),
    ]
    print_table("rollouts and scale to zero (ratio = haif / baseline)", rows)
    print(f"  scale from zero, s per round: {[round(z, 2) for z in zero]}; cold start: {[round(c, 2) for c in cold]}")
    print(f"wrote {write_results(BENCH, rows)}")


if __name__ == "__main__":
    main()
