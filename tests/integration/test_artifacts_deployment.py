"""Workers load only signed, verified bytes: the session deployment serves MiniLM and tiny-llama
from the artifact store (two local replicas and one on S3) and refuses the tampered ones.

The refused artifacts are prepared before the deployment (tests/support/artifacts.py):
a flipped byte in every replica, an edited manifest, a signature by an untrusted key.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import ray

from tests.support.artifacts import ArtifactSetup
from tests.support.waiting import wait_for

REFUSED = {
    "tampered-blob": "artifact_corrupt",
    "tampered-manifest": "manifest_invalid",
    "untrusted": "untrusted_signer",
}


def test_readyz_names_each_refused_model_and_why(http: httpx.Client) -> None:
    resp = http.get("/readyz")
    assert resp.status_code == 503
    models = resp.json()["models"]
    for name, reason in REFUSED.items():
        assert models[name]["state"] == "failed", models[name]
        error = models[name]["error"]
        assert f"refused artifact {name}:1 [{reason}]" in error, error
    assert "weights.bin" in models["tampered-blob"]["error"]  # the file that failed
    assert "signature does not match" in models["tampered-manifest"]["error"]
    for name in ("minilm", "tiny-llama", "signed-echo"):
        assert models[name]["state"] == "ready", models[name]
    # The store itself is probed: two local replicas and the moto S3 one all answer.
    store = resp.json()["artifact_store"]
    assert store["reachable"] == 3 and set(store["replicas"].values()) == {"ok"}, store


def test_the_rest_of_the_platform_keeps_serving(http: httpx.Client, auth: dict) -> None:
    emb = http.post(
        "/v1/embeddings", headers=auth, json={"model": "minilm", "input": ["signed bytes"]}
    )
    assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 384
    chat = http.post(
        "/v1/chat/completions",
        headers=auth,
        json={
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
    )
    assert chat.status_code == 200, chat.text
    echo = http.post(
        "/v1/completions", headers=auth, json={"model": "signed-echo", "prompt": "still here"}
    )
    assert echo.json()["choices"][0]["text"] == "still here"
    for name, reason in REFUSED.items():
        resp = http.post("/v1/completions", headers=auth, json={"model": name, "prompt": "x"})
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "model_load_failed"
        assert f"refused artifact {name}:1 [{reason}]" in resp.json()["error"]["message"]


def test_workers_run_the_verified_bytes_from_the_node_cache(
    orchestrator, artifact_setup: ArtifactSetup
) -> None:  # noqa: ANN001
    cache = artifact_setup.env["HAIF_ARTIFACTS__CACHE_DIR"]
    for name in ("minilm", "tiny-llama"):
        (info,) = orchestrator.workers_info.remote(name).result()
        artifact = info["artifact"]
        assert artifact["name"] == f"{name}:1" and artifact["signer"] == artifact_setup.dev_key_id
        view = Path(artifact["path"])
        assert view.parent == Path(cache) / "views"
        files = [p for p in view.rglob("*") if not p.is_dir()]
        assert files and all(p.is_symlink() for p in files)
        assert all(os.path.realpath(p).startswith(f"{cache}/blobs/") for p in files)


def test_workers_on_one_node_share_one_cache(orchestrator, artifact_setup: ArtifactSetup) -> None:  # noqa: ANN001
    # Two models run signed-echo:1 (signed-echo, and rollout-echo before any rollout), two
    # workers each, all loaded at once: each blob crossed from a replica once, to whichever
    # worker came first; the three others hit the cache.
    infos = [i for m in ("signed-echo", "rollout-echo") for i in orchestrator.workers_info.remote(m).result()]
    assert len(infos) == 4
    summaries = [i["artifact"] for i in infos]
    assert {s["name"] for s in summaries} == {"signed-echo:1"}
    blobs = artifact_setup.signed_echo_blobs
    assert sum(s["blobs_fetched"] for s in summaries) == blobs, summaries
    assert sum(s["blobs_hit"] for s in summaries) == 3 * blobs, summaries
    assert len({s["path"] for s in summaries}) == 1


def test_each_refusal_is_an_event_and_a_metric(orchestrator, haif) -> None:  # noqa: ANN001
    for name, reason in REFUSED.items():
        (info,) = orchestrator.workers_info.remote(name).result()
        assert info["state"] == "failed"
        (event,) = info["artifact_events"]
        assert (event["event"], event["model"], event["artifact"], event["reason"]) == (
            "artifact_refused",
            name,
            f"{name}:1",
            reason,
        )
    port = ray._private.worker.global_worker.node.metrics_export_port

    def counted() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {}
        for line in text.splitlines():
            if line.startswith("ray_haif_artifact_verify_failures_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                found[reason] = found.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
        return found if set(found) >= set(REFUSED.values()) else {}

    found = wait_for(
        counted, timeout_s=60, interval_s=1, what="the refusal metric on Ray's metrics endpoint"
    )
    assert all(found[r] >= 1 for r in REFUSED.values())


@pytest.fixture
def worker(ray_cluster: str, artifact_setup: ArtifactSetup):  # noqa: ANN201
    from actors.worker import ModelWorker
    from haif.artifacts.keys import load_public_key
    from haif.config import ModelConfig, load_config
    from tests.support.deployment import CONFIG, ROOT

    artifacts = load_config(ROOT / CONFIG, environ=artifact_setup.env).artifacts
    dev_public = load_public_key(artifact_setup.env["HAIF_ARTIFACTS__DEV_SIGNING_KEY"] + ".pub")
    artifacts = artifacts.model_copy(
        update={"trusted_keys": [dev_public.text()], "loaded_models_max": 2}
    )
    model = ModelConfig(name="versions", runtime="echo", artifact="signed-echo:1", device="cpu")
    actor = (
        ray.remote(ModelWorker)
        .options(num_cpus=0.1)
        .remote(model, 1024, str(ROOT), "versions/0", artifacts)
    )
    yield actor
    ray.kill(actor)


def test_a_warm_model_serves_without_reloading(worker) -> None:  # noqa: ANN001
    first = ray.get(worker.load.remote())
    assert (first["state"], first["warm"], first["loaded"]) == (
        "ready",
        False,
        ["artifact:signed-echo:1"],
    )
    second = ray.get(worker.load.remote(artifact="signed-echo:2"))
    assert second["artifact"]["name"] == "signed-echo:2" and not second["warm"]
    back = ray.get(worker.load.remote(artifact="signed-echo:1"))
    assert back["warm"] and back["artifact"]["name"] == "signed-echo:1"
    assert back["loaded"] == ["artifact:signed-echo:2", "artifact:signed-echo:1"]
    third = ray.get(worker.load.remote(artifact="signed-echo:3"))  # the LRU holds 2: version 2 goes
    assert third["loaded"] == ["artifact:signed-echo:1", "artifact:signed-echo:3"]
    # A refused version leaves the worker serving what it had, on verified bytes.
    with pytest.raises(Exception, match=r"refused artifact untrusted:1 \[untrusted_signer\]"):
        ray.get(worker.load.remote(artifact="untrusted:1"))
    after = ray.get(worker.info.remote())
    assert after["state"] == "ready" and after["artifact"]["name"] == "signed-echo:3"
