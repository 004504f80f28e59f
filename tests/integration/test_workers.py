"""Worker actors: GPU pinning, CPU fallback, streaming cancellation."""

from __future__ import annotations

import httpx

from tests.support.deployment import Deployment
from tests.support.waiting import wait_for


def test_each_gpu_worker_holds_its_own_gpu(orchestrator) -> None:  # noqa: ANN001
    infos = orchestrator.workers_info.remote("gpu-echo").result()
    assert len(infos) == 2
    ids = [tuple(i["gpu_ids"]) for i in infos]
    assert all(len(g) == 1 for g in ids), ids
    assert len(set(ids)) == 2, f"two workers share a GPU: {ids}"
    for info in infos:
        # Ray pins the process to its device: CUDA sees exactly the GPU it was given.
        assert info["cuda_visible_devices"] == info["gpu_ids"][0]


def test_gpu_model_falls_back_to_cpu_when_allowed(orchestrator, http: httpx.Client, auth: dict) -> None:  # noqa: ANN001
    (info,) = orchestrator.workers_info.remote("gpu-fallback").result()
    assert info["gpu_ids"] == []
    assert info["device"] == "cpu"
    status = orchestrator.status.remote().result()
    assert status["models"]["gpu-fallback"]["device"] == "cpu"
    resp = http.post("/v1/completions", headers=auth, json={"model": "gpu-fallback", "prompt": "still served"})
    assert resp.json()["choices"][0]["text"] == "still served"


def test_cpu_models_hold_no_gpu(orchestrator) -> None:  # noqa: ANN001
    for info in orchestrator.workers_info.remote("echo").result():
        assert info["gpu_ids"] == []


def test_client_disconnect_cancels_generation(orchestrator, haif: Deployment) -> None:  # noqa: ANN001
    def worker() -> dict:
        (info,) = orchestrator.workers_info.remote("echo-slow").result()
        return info

    before = worker()
    # 200 tokens at 50 ms each: 10 s if nobody stops it.
    body = {"model": "echo-slow", "prompt": "tok " * 200, "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=haif.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", headers=haif.headers(), json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break  # hang up mid-stream
    after = wait_for(
        lambda: (w := worker())["cancelled"] > before["cancelled"] and w["in_flight"] == 0 and w,
        timeout_s=5,
        what="the worker to cancel the abandoned stream",
    )
    assert after["served"] == before["served"], "the abandoned stream ran to completion"


def _alive_workers() -> dict[str, list]:
    """The cluster's live worker actors by name (every HAIF worker is a named actor)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "ModelWorker"), ("state", "=", "ALIVE")], limit=1000)
    by_name: dict[str, list] = {}
    for actor in actors:
        by_name.setdefault(actor.name, []).append(actor)
    return by_name


def test_one_fleet_whatever_the_orchestrator_replicas(haif: Deployment, orchestrator) -> None:  # noqa: ANN001
    """Two Orchestrator replicas (tests/configs/integration.yaml), one set of workers:
    exactly `workers` actors per model, region and tier (an elastic model's within its
    bounds), one actor per name."""
    from ray.util.state import list_actors

    from haif.config import load_config
    from tests.support.deployment import CONFIG

    replicas = list_actors(filters=[("class_name", "=", "ServeReplica:haif:Orchestrator"), ("state", "=", "ALIVE")])
    assert len(replicas) == 2
    config = load_config(CONFIG, environ={})
    by_name = _alive_workers()
    assert all(len(actors) == 1 for actors in by_name.values()), by_name
    for model in config.models:
        placed = [n for n in by_name if n.startswith(f"haif/{model.name}/")]
        pools = len(config.model_regions(model)) * (1 + len(model.dedicated_tenants))
        if model.name == "gpu-hungry":  # no GPU left for it
            assert placed == []
        elif model.autoscaling is not None:  # elastic: within its bounds, whatever the load did
            assert model.autoscaling.min_workers * pools <= len(placed) <= model.max_workers * pools, placed
        else:
            assert len(placed) == model.workers * pools, (model.name, placed)
    # Both replicas see the same fleet: the table they publish has one version.
    versions = {orchestrator.status.remote().result()["table_version"] for _ in range(12)}
    assert len(versions) == 1, versions


def test_two_gateways_keep_two_workers_balanced(haif: Deployment, orchestrator) -> None:  # noqa: ANN001
    """64 concurrent requests through two Gateway replicas onto two workers: each worker
    serves between 40 % and 60 % of them (power of two choices on own and reported load)."""
    import asyncio

    def served() -> dict[str, int]:
        return {w["worker_id"]: w["served"] for w in orchestrator.workers_info.remote("echo-pair").result()}

    before = served()
    assert len(before) == 2

    async def burst() -> list[int]:
        # One connection each: Serve's proxy spreads them over both Gateway replicas.
        async def one() -> int:
            async with httpx.AsyncClient(base_url=haif.url, headers=haif.headers(), timeout=60) as client:
                body = {"model": "echo-pair", "prompt": "a b c d e f g h", "max_tokens": 8}
                return (await client.post("/v1/completions", json=body)).status_code

        return list(await asyncio.gather(*(one() for _ in range(64))))

    assert asyncio.run(burst()) == [200] * 64
    after = served()
    split = sorted(after[w] - before[w] for w in after)
    assert sum(split) == 64 and split[0] >= 64 * 0.4, f"split {split}"
