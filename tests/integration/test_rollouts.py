"""Rollouts on a running deployment: a canary version beside the stable one, its traffic
weight, promote and rollback under load with nothing failing, a refused version that
never gets traffic, and a crashing canary rolled back on its own.

``rollout-echo`` serves the signed artifact ``signed-echo``; versions 1, 2 and 3 are
signed by the deployment's trusted key, version 9 by a key it does not trust
(tests/support/artifacts.py). The tests run in file order: each starts
from the state the one before left (after the promote, version 2 is the stable one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
import ray
from sqlalchemy import create_engine, text

from haif.config import load_config
from tests.support.deployment import CONFIG, Deployment, haif_cli
from tests.support.waiting import wait_for

MODEL = "rollout-echo"
NAMESPACE = load_config(CONFIG).ray.namespace


@pytest.fixture(scope="module")
def db(pg_url: str, haif: Deployment):  # noqa: ANN201 - the deployment migrated it
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def readyz(haif: Deployment) -> dict:
    return httpx.get(f"{haif.url}/readyz", timeout=10).json()["models"][MODEL]


def status(store_env: dict) -> dict:
    return json.loads(haif_cli(store_env, "rollout", "status", MODEL, "--json"))


def fleet(orchestrator) -> dict:  # noqa: ANN001
    return orchestrator.status.remote().result()["models"][MODEL]


def wait_weights(haif: Deployment, weights: dict[str, int], timeout_s: float = 60) -> dict:
    return wait_for(
        lambda: (m := readyz(haif))["weights"] == weights and m, timeout_s, 0.2,
        f"the Gateways to route {MODEL} with weights {weights}",
    )


@dataclass
class Outcome:
    status: int
    fingerprint: str | None
    header: str | None
    done: bool  # a stream that ended with [DONE] (a plain answer: True)
    stream: bool
    error: str | None = None


async def call(client: httpx.AsyncClient, stream: bool = False, **extra: object) -> Outcome:
    body = {"model": MODEL, "prompt": "one two three four five six seven eight", "max_tokens": 8, **extra}
    if not stream:
        resp = await client.post("/v1/completions", json=body)
        fp = resp.json().get("system_fingerprint") if resp.status_code == 200 else None
        error = None if resp.status_code == 200 else resp.text[:300]
        return Outcome(resp.status_code, fp, resp.headers.get("x-haif-model-version"), True, False, error)
    prints: set[str] = set()
    done, error = False, None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and resp.status_code == 200:
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = str(chunk["error"])[:300]
                else:
                    prints.add(chunk.get("system_fingerprint"))
            elif resp.status_code != 200:
                error = (error or "") + line[:300]
        header = resp.headers.get("x-haif-model-version")
        assert len(prints) <= 1, f"one stream, one version: {prints}"
        done = done and error is None
        return Outcome(resp.status_code, next(iter(prints), None), header, done, True, error)


def client(haif: Deployment) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=haif.url, headers=haif.headers(), timeout=120)


async def load_while(haif: Deployment, action, clients: int = 50, tokens: int = 8) -> list[Outcome]:  # noqa: ANN001
    """``clients`` concurrent clients (half streamed) send requests of ``tokens`` tokens
    until ``action`` (run in a thread) returns, and for one more round after it."""
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    prompt = " ".join(f"w{i}" for i in range(tokens))

    async def one_client(i: int, http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            outcomes.append(await call(http, stream=i % 2 == 1, prompt=prompt, max_tokens=tokens))
        outcomes.append(await call(http, stream=i % 2 == 1, prompt=prompt, max_tokens=tokens))

    async with client(haif) as http:
        tasks = [asyncio.create_task(one_client(i, http)) for i in range(clients)]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(action)
        stop.set()
        await asyncio.gather(*tasks)
    return outcomes


def failures(outcomes: list[Outcome]) -> list[tuple[int, bool, str | None]]:
    return [(o.status, o.stream, o.error) for o in outcomes if o.status != 200 or not o.done]


def test_before_any_rollout_every_answer_names_the_config_version(haif: Deployment) -> None:
    async def run() -> list[Outcome]:
        async with client(haif) as http:
            return [await call(http), await call(http, stream=True)]

    for outcome in asyncio.run(run()):
        assert outcome.status == 200
        assert outcome.fingerprint == outcome.header == f"{MODEL}:1"


def test_a_canary_gets_its_weight_once_ready(haif: Deployment, store_env: dict, db) -> None:  # noqa: ANN001
    out = haif_cli(store_env, "rollout", "set", MODEL, "--version", "2", "--weight", "30")
    assert "1 70%, 2 30%" in out, out
    wait_weights(haif, {"1": 70, "2": 30})
    assert status(store_env)["canary_status"] == "ready"

    async def run() -> list[Outcome]:
        async with client(haif) as http:
            outcomes: list[Outcome] = []
            for _ in range(12):  # 600 requests, 50 at a time
                outcomes += await asyncio.gather(*(call(http, stream=i % 4 == 0) for i in range(50)))
            return outcomes

    outcomes = asyncio.run(run())
    assert not failures(outcomes)
    assert all(o.fingerprint == o.header for o in outcomes)
    share = Counter(o.fingerprint for o in outcomes)
    assert set(share) == {f"{MODEL}:1", f"{MODEL}:2"}, share
    assert 0.25 <= share[f"{MODEL}:2"] / len(outcomes) <= 0.35, share

    # The job rows and usage records name the version that served each request.
    with db.connect() as conn:
        rows = conn.execute(text(
            "SELECT j.version, u.version FROM jobs j JOIN usage_records u ON u.job_id = j.id "
            "WHERE j.model = :m ORDER BY j.created_at DESC LIMIT 600"
        ), {"m": MODEL}).all()
    assert rows and all(job == usage for job, usage in rows)
    recorded = Counter(job for job, _ in rows)
    assert recorded["2"] > 0 and recorded["1"] > 0


def test_the_same_user_or_idempotency_key_sticks_to_one_version(haif: Deployment) -> None:
    async def run() -> tuple[list[set[str]], list[set[str]]]:
        async with client(haif) as http:
            users = []
            for i in range(12):
                user = f"user-{uuid.uuid4().hex[:8]}-{i}"
                seen = await asyncio.gather(*(call(http, user=user) for _ in range(6)))
                users.append({o.fingerprint for o in seen})
            keys = []
            for _ in range(6):
                key = uuid.uuid4().hex
                seen = []
                for _ in range(3):  # same key, same body: the same answer, replayed
                    resp = await http.post(
                        "/v1/completions", headers={"Idempotency-Key": key},
                        json={"model": MODEL, "prompt": "sticky", "max_tokens": 2},
                    )
                    seen.append(resp.json()["system_fingerprint"])
                keys.append(set(seen))
            return users, keys

    users, keys = asyncio.run(run())
    assert all(len(s) == 1 for s in users), users
    assert len(set().union(*users)) == 2, "12 users all on one version: the hash does not split"
    assert all(len(s) == 1 for s in keys), keys


def test_promote_under_load_fails_nothing_and_drains_the_old_version(
    haif: Deployment, store_env: dict, orchestrator  # noqa: ANN001
) -> None:
    old = {w["worker_id"] for w in orchestrator.workers_info.remote(MODEL).result() if w["version"] == "1"}
    assert len(old) == 2
    outcomes = asyncio.run(load_while(haif, lambda: haif_cli(store_env, "rollout", "promote", MODEL)))
    assert len(outcomes) >= 100
    assert not failures(outcomes), f"{len(failures(outcomes))}/{len(outcomes)} failed: {failures(outcomes)[:10]}"
    wait_weights(haif, {"2": 100})
    wait_for(lambda: "1" not in fleet(orchestrator)["versions"], 60, 0.5, "version 1's workers to drain and stop")
    left = {w["worker_id"] for w in orchestrator.workers_info.remote(MODEL).result()}
    assert not old & left, "the old version's workers are gone"
    row = status(store_env)
    assert row["stable_version"] == "2" and row["canary_version"] is None


def test_rollback_under_load_fails_nothing_and_drains_the_canary(
    haif: Deployment, store_env: dict, orchestrator  # noqa: ANN001
) -> None:
    haif_cli(store_env, "rollout", "set", MODEL, "--version", "3", "--weight", "50")
    wait_weights(haif, {"2": 50, "3": 50})
    outcomes = asyncio.run(load_while(haif, lambda: haif_cli(store_env, "rollout", "rollback", MODEL)))
    assert not failures(outcomes), f"{len(failures(outcomes))}/{len(outcomes)} failed: {failures(outcomes)[:10]}"
    assert {o.fingerprint for o in outcomes} == {f"{MODEL}:2", f"{MODEL}:3"}
    wait_weights(haif, {"2": 100})
    wait_for(lambda: "3" not in fleet(orchestrator)["versions"], 60, 0.5, "the canary's workers to stop")
    assert status(store_env)["reason"] == "rolled back by the operator"


def test_a_refused_version_gets_no_traffic_and_the_status_says_why(
    haif: Deployment, store_env: dict, orchestrator  # noqa: ANN001
) -> None:
    haif_cli(store_env, "rollout", "set", MODEL, "--version", "9", "--weight", "50")
    row = wait_for(lambda: (r := status(store_env))["canary_status"] == "failed" and r, 60, 0.5,
                   "the refused canary's status")
    assert "gets no traffic" in row["reason"] and "9" in row["reason"], row
    assert "trust" in row["reason"].lower() or "signer" in row["reason"].lower(), row
    assert readyz(haif)["weights"] == {"2": 100}

    async def run() -> list[Outcome]:
        async with client(haif) as http:
            return list(await asyncio.gather(*(call(http) for _ in range(40))))

    outcomes = asyncio.run(run())
    assert not failures(outcomes)
    assert {o.fingerprint for o in outcomes} == {f"{MODEL}:2"}
    shown = haif_cli(store_env, "rollout", "status", MODEL)
    assert "failed" in shown and "gets no traffic" in shown
    haif_cli(store_env, "rollout", "rollback", MODEL)
    wait_for(lambda: "9" not in fleet(orchestrator)["versions"], 60, 0.5, "the refused canary to go")


def test_a_crashing_canary_is_rolled_back_on_its_own(
    haif: Deployment, store_env: dict, orchestrator, db  # noqa: ANN001
) -> None:
    haif_cli(store_env, "rollout", "set", MODEL, "--version", "3", "--weight", "50")
    wait_weights(haif, {"2": 50, "3": 50})

    def crash_the_canary() -> None:
        # Its workers die under requests (0.5 s each), again and again: each is replaced,
        # takes requests again, and dies with them.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for info in orchestrator.workers_info.remote(MODEL).result():
                if info["version"] == "3" and info["in_flight"] >= 2:
                    with contextlib.suppress(ValueError):  # gone already
                        ray.kill(ray.get_actor(info["name"], namespace=NAMESPACE), no_restart=True)
            time.sleep(0.05)
            with db.connect() as conn:
                row = conn.execute(text("SELECT canary_version FROM rollouts WHERE model = :m"), {"m": MODEL}).one()
            if row[0] is None:
                return
        raise AssertionError("the Orchestrator did not roll the crashing canary back within 120 s")

    asyncio.run(load_while(haif, crash_the_canary, clients=20, tokens=100))
    row = status(store_env)
    assert row["auto_rollbacks"] == 1 and row["reason"].startswith("rolled back automatically"), row
    wait_weights(haif, {"2": 100})
    metrics = httpx.get(f"{haif.url}/metrics", timeout=30).text
    assert f'haif_rollout_auto_rollbacks_total{{model="{MODEL}",version="3"}} 1' in metrics


def test_rollout_list_shows_every_model(store_env: dict) -> None:
    listed = {r["model"]: r for r in json.loads(haif_cli(store_env, "rollout", "list", "--json"))}
    assert listed[MODEL]["weights"] == {"2": 100}
    assert listed["echo"]["weights"] == {"1": 100}


def test_a_drained_worker_is_replaced_first_and_stops_without_failing_a_request(
    haif: Deployment, store_env: dict, orchestrator  # noqa: ANN001
) -> None:
    workers = orchestrator.workers_info.remote(MODEL).result()
    assert len(workers) == 2 and all(w["state"] == "ready" for w in workers)
    victim = workers[0]["worker_id"]
    out = asyncio.run(load_while(haif, lambda: (
        haif_cli(store_env, "workers", "drain", victim),
        wait_for(lambda: victim not in {w["worker_id"] for w in orchestrator.workers_info.remote(MODEL).result()},
                 60, 0.3, f"{victim} drained and stopped"),
    ), clients=20))
    assert not failures(out), f"{len(failures(out))}/{len(out)} failed: {failures(out)[:10]}"
    after = wait_for(
        lambda: (ws := orchestrator.workers_info.remote(MODEL).result()) and len(ws) == 2
        and all(w["state"] == "ready" for w in ws) and ws,
        60, 0.3, "two ready workers again",
    )
    assert victim not in {w["worker_id"] for w in after}
