"""Worker actors: GPU pinning, CPU fallback, streaming cancellation."""

from __future__ import annotations

import httpx

from tests.integration.conftest import Deployment, wait_for


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
