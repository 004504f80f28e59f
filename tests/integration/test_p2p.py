"""Peers call HAIF over Hyperswarm RPC: the deployment's P2P shim on a local hyperdht
testnet, called by a Node peer that uses the real @hyperswarm/rpc (the sidecar package's
``tools/peer.js``). Same answers as HTTP, streams that join to them, the same admission
(peer key → tenant, rate limits, usage records), typed errors, bad input survived, and a
sidecar that comes back by itself after a SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from haif.store.models import Job, Tenant, UsageRecord
from tests.support.deployment import CONFIG, ROOT, Deployment, haif_cli
from tests.support.oidc_provider import AUDIENCE, OidcProvider
from tests.support.p2p import node_public_key, run_peer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def shim(haif: Deployment, http: httpx.Client) -> dict:
    """The shim's state once it is up on the testnet (its public key, from /readyz)."""

    def up() -> dict | None:
        p2p = http.get("/readyz").json().get("p2p") or {}
        return p2p if p2p.get("state") == "ok" and p2p.get("listening_key") else None

    return wait_for(up, 120, 0.5, "the P2P shim up on the testnet")


@pytest.fixture(scope="module")
def peer(store_env: dict[str, str]) -> dict:
    """A peer (its key seed) mapped to a tenant of its own with a requests-per-minute limit."""
    seed = secrets.token_bytes(32)
    key = node_public_key(seed)
    tenant = f"p2p-{uuid.uuid4().hex[:8]}"
    haif_cli(store_env, "tenants", "create", tenant, "--requests-per-minute", "1000")
    haif_cli(store_env, "p2p", "peers", "add", key, "--tenant", tenant)
    return {"seed": seed, "key": key, "tenant": tenant}


def _call(testnet: list[str], shim: dict, peer: dict, *calls: dict) -> list[dict]:
    report = run_peer(testnet, shim["public_key"], list(calls), seed=peer["seed"])
    assert report["public_key"] == peer["key"]
    return report["results"]


def test_each_method_answers_as_http_does(
    testnet: list[str], shim: dict, peer: dict, http: httpx.Client, auth: dict
) -> None:
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello there"}], **GREEDY}
    completion = {"model": "tiny-llama", "prompt": "once upon a time", **GREEDY}
    embedding = {"model": "minilm", "input": ["a sentence to embed"]}
    models, chat_p2p, completion_p2p, embedding_p2p, streamed = _call(
        testnet, shim, peer,
        {"method": "haif.models", "value": {}},
        {"method": "haif.chat", "value": chat},
        {"method": "haif.completions", "value": completion},
        {"method": "haif.embeddings", "value": embedding},
        {"method": "haif.chat", "value": {**chat, "stream": True, "haif": {"request_id": "p2p-stream-1"}}},
    )
    assert {m["id"] for m in models["value"]["data"]} == {m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]}
    chat_http = http.post("/v1/chat/completions", headers=auth, json=chat).json()
    assert chat_p2p["value"]["choices"][0]["message"] == chat_http["choices"][0]["message"]
    assert chat_p2p["value"]["usage"] == chat_http["usage"]
    completion_http = http.post("/v1/completions", headers=auth, json=completion).json()
    assert completion_p2p["value"]["choices"][0]["text"] == completion_http["choices"][0]["text"]
    embedding_http = http.post("/v1/embeddings", headers=auth, json=embedding).json()
    assert embedding_p2p["value"]["data"][0]["embedding"] == pytest.approx(embedding_http["data"][0]["embedding"])
    # The stream's chunks join to the plain answer.
    assert streamed["chunks"], streamed
    text = "".join(
        (c["choices"][0]["delta"].get("content") or "") for c in streamed["chunks"] if c["choices"]
    )
    assert text == chat_http["choices"][0]["message"]["content"]
    assert streamed["value"]["object"] == "haif.stream.end"


def test_a_peer_gets_an_adapter_named_as_http_names_it(
    testnet: list[str], shim: dict, peer: dict, http: httpx.Client, auth: dict
) -> None:
    """An adapter requested by its own served name: BASE:ADAPTER in the plain answer and in
    every streamed chunk, as over HTTP."""
    served = "tiny-llama-lora:lora-a"
    wait_for(lambda: http.get("/readyz").json()["models"]["tiny-llama-lora"]["state"] == "ready",
             600, 1.0, "tiny-llama-lora ready")
    chat = {"model": "lora-a", "messages": [{"role": "user", "content": "hello there"}], **GREEDY}
    plain, streamed = _call(
        testnet, shim, peer,
        {"method": "haif.chat", "value": chat},
        {"method": "haif.chat", "value": {**chat, "stream": True}},
    )
    assert plain["value"]["model"] == served, plain
    assert streamed["chunks"] and {c["model"] for c in streamed["chunks"]} == {served}, streamed
    assert http.post("/v1/chat/completions", headers=auth, json=chat).json()["model"] == served


def test_an_unmapped_key_is_unauthorized(testnet: list[str], shim: dict) -> None:
    (result,) = run_peer(testnet, shim["public_key"], [{"method": "haif.models", "value": {}}])["results"]
    assert result["error"]["cause"]["code"] == "UNAUTHORIZED", result


def test_a_peer_may_present_a_token_in_the_envelope(
    testnet: list[str], shim: dict, haif: Deployment, oidc_issuer: OidcProvider
) -> None:
    """A key mapped to no tenant, with `haif.token`: a HAIF key or a JWT of the trusted
    issuer, the caller is who the token names; a bad token is UNAUTHORIZED."""
    headers = haif.headers()
    tenant = f"p2ptok-{uuid.uuid4().hex[:8]}"
    assert httpx.post(f"{haif.url}/admin/v1/tenants", json={"name": tenant}, headers=headers, timeout=60).status_code == 201
    key = httpx.post(f"{haif.url}/admin/v1/tokens", json={"tenant": tenant}, headers=headers, timeout=60).json()
    made = httpx.post(f"{haif.url}/admin/v1/tenants", json={"name": "globex"}, headers=headers, timeout=60)
    assert made.status_code in (201, 409), made.text
    jwt = oidc_issuer.token("tenant-b", AUDIENCE)  # provider.js: tenant globex
    request = {"model": "echo", "prompt": "hi", "max_tokens": 2}
    with_key, with_jwt, with_bad = run_peer(testnet, shim["public_key"], [
        {"method": "haif.completions", "value": {**request, "haif": {"token": key["token"]}}},
        {"method": "haif.completions", "value": {**request, "haif": {"token": jwt}}},
        {"method": "haif.completions", "value": {**request, "haif": {"token": key["token"] + "x"}}},
    ])["results"]
    assert with_key["value"]["choices"][0]["text"], with_key
    assert with_jwt["value"]["choices"][0]["text"], with_jwt
    assert with_bad["error"]["cause"]["code"] == "UNAUTHORIZED", with_bad
    jobs = httpx.get(f"{haif.url}/admin/v1/jobs", params={"tenant": tenant}, headers=headers, timeout=60).json()
    assert [j["caller"] for j in jobs["data"]] == [f"token:{key['id']}"]


def test_haif_errors_arrive_with_their_codes(testnet: list[str], shim: dict, peer: dict) -> None:
    missing, invalid, bad_envelope = _call(
        testnet, shim, peer,
        {"method": "haif.chat", "value": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}},
        {"method": "haif.completions", "value": {"model": "echo", "prompt": "x", "max_tokens": -1}},
        {"method": "haif.completions", "value": {"model": "echo", "prompt": "x", "haif": {"timeout_s": "soon"}}},
    )
    assert missing["error"]["cause"]["code"] == "MODEL_NOT_FOUND"
    assert invalid["error"]["cause"]["code"] == "INVALID_REQUEST"
    assert "max_tokens" in invalid["error"]["cause"]["message"]
    assert bad_envelope["error"]["cause"]["code"] == "INVALID_REQUEST"


def test_a_peer_tenant_rate_limit_holds_exactly_and_each_job_is_billed(
    testnet: list[str], shim: dict, store_env: dict[str, str], pg_url: str
) -> None:
    seed = secrets.token_bytes(32)
    key = node_public_key(seed)
    tenant = f"p2p-rpm-{uuid.uuid4().hex[:8]}"
    haif_cli(store_env, "tenants", "create", tenant, "--requests-per-minute", "5")
    haif_cli(store_env, "p2p", "peers", "add", key, "--tenant", tenant)
    calls = [{"method": "haif.completions", "value": {"model": "echo", "prompt": f"n{i}", "max_tokens": 2}}
             for i in range(8)]
    results = run_peer(testnet, shim["public_key"], calls, seed=seed)["results"]
    ok = [r for r in results if "value" in r]
    refused = [r for r in results if "error" in r]
    assert len(ok) == 5 and len(refused) == 3, results
    assert {r["error"]["cause"]["code"] for r in refused} == {"RATE_LIMITED"}
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        def rows() -> list:
            return conn.execute(
                select(UsageRecord.job_id).join(Tenant, Tenant.id == UsageRecord.tenant_id).where(Tenant.name == tenant)
            ).all()

        wait_for(lambda: len(rows()) == 5, 30, 0.2, "a usage record per served P2P job")
        assert sorted(r[0] for r in rows()) == sorted(r["value"]["id"] for r in ok)
        jobs = conn.execute(select(Job.state).join(Tenant, Tenant.id == Job.tenant_id).where(Tenant.name == tenant)).all()
        assert sorted(j[0] for j in jobs) == ["succeeded"] * 5


def test_a_peer_that_leaves_mid_request_stops_it_in_the_gateway(
    testnet: list[str], shim: dict, store_env: dict[str, str], pg_url: str
) -> None:
    """The peer gives up on a 3.2 s request after 0.3 s and hangs up: the sidecar cancels it,
    and so does the Gateway (its job ends failed at once, not served to its end)."""
    seed = secrets.token_bytes(32)
    tenant = f"p2p-leave-{uuid.uuid4().hex[:8]}"
    haif_cli(store_env, "tenants", "create", tenant)
    haif_cli(store_env, "p2p", "peers", "add", node_public_key(seed), "--tenant", tenant)
    slow = {"model": "echo-slow", "prompt": " ".join(f"w{i}" for i in range(64)), "max_tokens": 64}  # 50 ms a token
    (result,) = run_peer(testnet, shim["public_key"], [{"method": "haif.completions", "value": slow, "timeout_ms": 300}],
                         seed=seed)["results"]
    assert result["error"]["code"] == "TIMEOUT_EXCEEDED", result  # the peer's own timeout; then it hangs up
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        def job() -> tuple | None:
            row = conn.execute(
                select(Job.state, Job.created_at, Job.finished_at).join(Tenant, Tenant.id == Job.tenant_id)
                .where(Tenant.name == tenant)
            ).one_or_none()
            conn.commit()
            return row if row is not None and row.finished_at is not None else None

        state, created_at, finished_at = wait_for(job, 30, 0.2, "the job settled")
    assert state == "failed"
    assert (finished_at - created_at).total_seconds() < 2.5  # stopped, not run for 64 tokens


def test_bad_input_leaves_the_sidecar_serving(testnet: list[str], shim: dict, peer: dict) -> None:
    oversize = "x" * (5 * 1024 * 1024)  # over p2p.max_message_bytes (4 MiB): the sidecar refuses it
    big = "x " * (600 * 1024)  # over limits.max_body_bytes (1 MiB), as HTTP answers 413
    results = _call(
        testnet, shim, peer,
        {"method": "haif.completions", "value": {"model": "echo", "prompt": oversize}},
        {"method": "haif.chat", "raw_hex": "7b6f6f7073"},  # '{oops': not JSON
        {"method": "haif.chat", "raw_hex": ""},
        {"method": "haif.chat", "value": [1, 2, 3]},
        {"method": "haif.completions", "value": {"model": "echo", "prompt": big}},
        {"method": "haif.nope", "value": {}},
        {"method": "haif.chat", "value": {"model": "echo", "messages": "not a list"}},
        {"method": "haif.completions", "value": {"model": "echo", "prompt": "still here", "max_tokens": 4}},
    )
    *bad, good = results
    assert all("error" in r for r in bad), bad
    assert good["value"]["choices"][0]["text"] == "still here"


def test_a_killed_sidecar_comes_back_and_serves(
    testnet: list[str], shim: dict, peer: dict, http: httpx.Client
) -> None:
    os.kill(shim["pid"], signal.SIGKILL)

    def back() -> dict | None:
        p2p = http.get("/readyz").json().get("p2p") or {}
        return p2p if p2p.get("state") == "ok" and p2p.get("pid") not in (None, shim["pid"]) else None

    again = wait_for(back, 60, 0.5, "the sidecar restarted by its supervisor")
    assert again["public_key"] == shim["public_key"], "the same key after the restart"
    (result,) = _call(testnet, shim, peer, {"method": "haif.completions",
                                            "value": {"model": "echo", "prompt": "back again", "max_tokens": 4}})
    assert result["value"]["choices"][0]["text"] == "back again"


REMOTE_SEED = hashlib.sha256(b"haif integration tests: the remote P2P worker").digest()


def _job_workers(pg_url: str, ids: list[str]) -> dict[str, str]:
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Job.id, Job.worker).where(Job.id.in_(ids))).all()
    return {r[0]: r[1] for r in rows}


def test_a_remote_p2p_worker_serves_and_its_death_fails_over_to_a_local_worker(
    testnet: list[str], shim: dict, http: httpx.Client, auth: dict, orchestrator, pg_url: str,
    tmp_path: Path,
) -> None:
    """`haif p2p worker` on the testnet, registered as a worker of `echo-remote` (one local
    worker beside it): it serves HTTP requests for the model; killed, its breaker opens and
    requests go to the local worker within their deadline."""
    seed_file = tmp_path / "worker.seed"
    seed_file.write_bytes(REMOTE_SEED)
    seed_file.chmod(0o600)
    env = {**os.environ, "HAIF_P2P__ENABLED": "true", "HAIF_P2P__BOOTSTRAP": json.dumps(testnet),
           "HAIF_SERVER__STATE_DIR": str(tmp_path / "state")}
    haif = str(Path(sys.executable).parent / "haif")
    proc = subprocess.Popen(
        [haif, "p2p", "worker", "--model", "echo-remote", "--seed-file", str(seed_file),
         "--allow", shim["public_key"], "--config", CONFIG],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = ""
        while not line.startswith("public key:"):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "haif p2p worker exited"
        assert line.split(":", 1)[1].strip() == node_public_key(REMOTE_SEED)

        def remote_ready() -> bool:
            status = orchestrator.status.remote().result()["models"]["echo-remote"]
            return "ready" in status["p2p_workers"].values()

        wait_for(remote_ready, 60, 0.5, "the remote P2P worker ready in the Orchestrator's table")
        body = {"model": "echo-remote", "prompt": "over the peer to peer wire", "max_tokens": 8}

        def served_remotely() -> bool:
            ids = [http.post("/v1/completions", headers=auth, json=body).json()["id"] for _ in range(6)]
            workers = wait_for(lambda: (w := _job_workers(pg_url, ids)) and all(w.values()) and w, 20, 0.2,
                               "the jobs' workers recorded")
            return any("/p2p/" in w for w in workers.values())

        wait_for(served_remotely, 60, 1.0, "a request served by the remote P2P worker")
        streamed = []
        with http.stream("POST", "/v1/completions", headers=auth, json={**body, "stream": True}) as resp:
            streamed = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert streamed[-1] == "data: [DONE]"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # Killed: requests are served by the local worker, each within its deadline. The first
    # ones may still go to the dead peer (the shim has not seen its connection drop): they
    # carry an Idempotency-Key, so that one that reached the peer is retried elsewhere.
    for i in range(12):
        started = time.monotonic()
        headers = {**auth, "X-Request-Timeout": "10", "Idempotency-Key": f"p2p-failover-{uuid.uuid4().hex}-{i}"}
        resp = http.post("/v1/completions", headers=headers, json=body)
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - started < 10 + 2
    ids = [http.post("/v1/completions", headers=auth, json=body).json()["id"] for _ in range(4)]
    workers = wait_for(lambda: (w := _job_workers(pg_url, ids)) and all(w.values()) and w, 20, 0.2, "workers")
    assert not any("/p2p/" in w for w in workers.values()), workers
