"""Tenancy end to end: two Gateway replicas, one PostgreSQL, Redis, the HTTP API and the CLI.

The deployment is the shared one (tests/configs/integration.yaml: gateway_replicas 2,
PostgreSQL and Redis of this session). Tenants and tokens are made with the `haif` CLI.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from haif.store.models import Job, Quota, Tenant, UsageRecord
from tests.support.deployment import Deployment, haif_cli
from tests.support.tenancy import new_tenant, new_token, served
from tests.support.waiting import wait_for

AUTH_BODY = {
    "error": {
        "message": "invalid or missing API key",
        "type": "authentication_error",
        "code": "invalid_api_key",
    }
}


@pytest.fixture(scope="module")
def db(pg_url: str, haif: Deployment):  # noqa: ANN201 - the deployment migrated it
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def tenant_usage(db, tenant: str) -> list[tuple[str, int, int]]:  # noqa: ANN001
    with db.connect() as conn:
        rows = conn.execute(
            select(UsageRecord.job_id, UsageRecord.prompt_tokens, UsageRecord.completion_tokens)
            .join(Tenant, Tenant.id == UsageRecord.tenant_id)
            .where(Tenant.name == tenant)
        ).all()
    return [tuple(r) for r in rows]


def tenant_quota(db, tenant: str) -> Quota:  # noqa: ANN001
    with db.connect() as conn:
        return conn.execute(
            select(Quota).join(Tenant, Tenant.id == Quota.tenant_id).where(Tenant.name == tenant)
        ).one()


def tenant_jobs(db, tenant: str) -> list:  # noqa: ANN001
    with db.connect() as conn:
        return conn.execute(
            select(Job.id, Job.state, Job.gateway, Job.idempotency_key)
            .join(Tenant, Tenant.id == Job.tenant_id)
            .where(Tenant.name == tenant)
        ).all()


async def burst(
    url: str, token: str, body: dict, n: int, headers: dict | None = None
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        h = {"Authorization": f"Bearer {token}", **(headers or {})}
        return await asyncio.gather(
            *(client.post("/v1/completions", json=body, headers=h) for _ in range(n))
        )


def assert_429(resp: httpx.Response) -> None:
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["type"] == "rate_limit_error"


# --- quotas under concurrency -----------------------------------------------------------------


def both_gateways(burst_once: Callable[[], set[str]], tries: int = 3) -> None:
    """Run ``burst_once`` (which checks that the books are exact and returns the Gateway
    replicas that admitted its requests) until both replicas took part in one burst.

    Serve spreads requests over the replicas, but on a loaded machine one of them can win
    all of a burst's admissions; every try still checks exactness, and the quota must be
    seen holding across two replicas in at least one of them."""
    seen = [burst_once()]
    while len(seen[-1]) < 2 and len(seen) < tries:
        seen.append(burst_once())
    assert len(seen[-1]) == 2, f"the admitting Gateway replicas in {tries} bursts: {seen}"


def test_200_concurrent_requests_50_allowed_per_minute(
    haif: Deployment, store_env: dict, db
) -> None:  # noqa: ANN001
    """Requests per minute on Redis, across both Gateway replicas: exactly 50 pass."""

    def burst_once() -> set[str]:
        tenant = new_tenant(store_env, "--requests-per-minute", "50")
        token = new_token(store_env, tenant)
        body = {"model": "echo", "prompt": "one two three four five six", "max_tokens": 4}
        responses = asyncio.run(burst(haif.url, token, body, 200))
        ok = [r for r in responses if r.status_code == 200]
        assert len(ok) == 50, sorted({r.status_code for r in responses})
        for r in responses:
            if r.status_code != 200:
                assert_429(r)
        # Recorded usage equals what was served (settlement may finish just after the answer).
        served_usage = sorted(
            (r.json()["id"], r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"])
            for r in ok
        )
        wait_for(lambda: len(tenant_usage(db, tenant)) == 50, 30, what="50 usage records")
        assert sorted(tenant_usage(db, tenant)) == served_usage
        jobs = tenant_jobs(db, tenant)
        assert len(jobs) == 50 and {j.state for j in jobs} == {"succeeded"}
        return {j.gateway for j in jobs}

    both_gateways(burst_once)


def test_200_concurrent_requests_50_fit_tokens_per_minute_on_postgres(
    haif: Deployment,
    store_env: dict,
    db,  # noqa: ANN001
) -> None:
    """Tokens per minute: reservations on PostgreSQL under a row lock, across both replicas.

    Each request reserves exactly what it uses (8 prompt tokens, estimated from 32 bytes,
    plus max_tokens 4, all generated), so exactly 50 x 12 tokens fit a limit of 600.
    """

    def burst_once() -> set[str]:
        tenant = new_tenant(store_env, "--tokens-per-minute", "600")
        token = new_token(store_env, tenant)
        body = {"model": "echo", "prompt": "abc " * 8, "max_tokens": 4}
        responses = asyncio.run(burst(haif.url, token, body, 200))
        ok = [r for r in responses if r.status_code == 200]
        assert len(ok) == 50, sorted({r.status_code for r in responses})
        for r in ok:
            assert r.json()["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
        for r in responses:
            if r.status_code != 200:
                assert_429(r)
        wait_for(lambda: len(tenant_usage(db, tenant)) == 50, 30, what="50 usage records")
        assert sum(p + c for _, p, c in tenant_usage(db, tenant)) == 600
        quota = tenant_quota(db, tenant)
        assert (quota.minute_tokens, quota.in_flight) == (600, 0)
        return {j.gateway for j in tenant_jobs(db, tenant)}

    both_gateways(burst_once)


def _leases_taken(url: str) -> float:
    from tests.support.metrics import scrape, total

    with httpx.Client(base_url=url, timeout=30) as http:
        return total(scrape(http), "haif_quota_leases_total", event="taken")


def test_quota_leases_end_to_end_stay_within_the_limit_and_give_back(
    haif: Deployment,
    store_env: dict,
    db,  # noqa: ANN001
) -> None:
    """A limit large enough to lease from (3000 tokens a minute: blocks of 60 = 5 requests).

    Both Gateway replicas admit most requests from leases. A burst may end with a few
    units still leased by a replica whose requests ran out (its lease gives them back
    after ``quotas.lease_idle_s``), and a request admitted but then refused by the
    Orchestrator (backpressure: 429 after admission) is refunded; so bursts are repeated,
    each after the leases went idle, until one gets nothing. Then exactly
    3000 / 12 = 250 requests have been served, never more, and the tenant's window holds
    exactly what they used.
    """
    tenant = new_tenant(store_env, "--tokens-per-minute", "3000")
    token = new_token(store_env, tenant)
    body = {"model": "echo", "prompt": "abc " * 8, "max_tokens": 4}  # reserves and uses 12
    taken = _leases_taken(haif.url)
    ok: list[httpx.Response] = []
    for n in (300, 100, 100, 100, 100):
        responses = asyncio.run(burst(haif.url, token, body, n))
        got = [r for r in responses if r.status_code == 200]
        for r in responses:
            if r.status_code != 200:
                assert_429(r)
        ok += got
        assert len(ok) <= 250
        if not got:
            break
        time.sleep(1.5)  # idle leases give back what they did not hand out
    assert not got, "a burst that gets nothing: the quota is spent"
    books = Counter(j.state for j in tenant_jobs(db, tenant))
    assert len(ok) == 250, (books, tenant_quota(db, tenant).minute_tokens)
    assert _leases_taken(haif.url) > taken  # the Gateways admitted from leases
    wait_for(lambda: len(tenant_usage(db, tenant)) == 250, 30, what="250 usage records")
    assert sum(p + c for _, p, c in tenant_usage(db, tenant)) == 3000
    assert sorted(j for j, _, _ in tenant_usage(db, tenant)) == sorted(r.json()["id"] for r in ok)
    jobs = tenant_jobs(db, tenant)  # and, for requests refused after admission, failed ones
    assert sum(j.state == "succeeded" for j in jobs) == 250
    assert {j.state for j in jobs} <= {"succeeded", "failed"}
    quota = tenant_quota(db, tenant)
    assert (quota.minute_tokens, quota.in_flight) == (3000, 0)


def test_max_concurrent_slots_are_released(haif: Deployment, store_env: dict) -> None:
    tenant = new_tenant(store_env, "--max-concurrent", "2")
    token = new_token(store_env, tenant)
    body = {"model": "echo-slow", "prompt": "a b c d e f", "max_tokens": 6}  # ~300 ms each
    responses = asyncio.run(burst(haif.url, token, body, 6))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and set(codes) <= {200, 429}
    # Sequential requests never trip over a slot that is still held.
    with httpx.Client(
        base_url=haif.url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as c:
        for _ in range(5):
            assert (
                c.post("/v1/completions", json={"model": "echo", "prompt": "x"}).status_code == 200
            )


# --- idempotency -------------------------------------------------------------------------------


def test_50_concurrent_requests_with_one_idempotency_key(
    haif: Deployment,
    store_env: dict,
    db,  # noqa: ANN001
    orchestrator,
) -> None:  # noqa: ANN001
    tenant = new_tenant(store_env)
    token = new_token(store_env, tenant)
    body = {"model": "echo", "prompt": "pay the invoice number 42 now", "max_tokens": 8}
    before = served(orchestrator)
    responses = asyncio.run(burst(haif.url, token, body, 50, {"Idempotency-Key": "invoice-42"}))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1  # 50 identical answers, byte for byte
    assert served(orchestrator) - before == 1  # one execution
    wait_for(lambda: len(tenant_usage(db, tenant)) == 1, 30, what="one usage record")
    assert len(tenant_jobs(db, tenant)) == 1
    # Later: the same answer again, nothing executed; another body under the key: 409.
    with httpx.Client(
        base_url=haif.url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as c:
        again = c.post("/v1/completions", json=body, headers={"Idempotency-Key": "invoice-42"})
        assert again.content == responses[0].content
        reordered = json.loads(json.dumps({"max_tokens": 8, **body}))  # same body, other key order
        assert (
            c.post(
                "/v1/completions", json=reordered, headers={"Idempotency-Key": "invoice-42"}
            ).status_code
            == 200
        )
        other = c.post(
            "/v1/completions",
            json={**body, "max_tokens": 3},
            headers={"Idempotency-Key": "invoice-42"},
        )
        assert other.status_code == 409 and other.json()["error"]["type"] == "conflict_error"
        streamed = c.post(
            "/v1/completions", json={**body, "stream": True}, headers={"Idempotency-Key": "s-1"}
        )
        assert streamed.status_code == 400
    assert served(orchestrator) - before == 1
    assert len(tenant_usage(db, tenant)) == 1


def test_idempotent_embeddings_replay_bit_exact(
    haif: Deployment, store_env: dict, orchestrator
) -> None:  # noqa: ANN001
    tenant = new_tenant(store_env)
    token = new_token(store_env, tenant)
    body = {
        "model": "minilm",
        "input": [f"sentence {i}" for i in range(20)],
    }  # over the 4 KB ref threshold
    before = served(orchestrator, "minilm")
    with httpx.Client(
        base_url=haif.url,
        timeout=60,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "emb-1"},
    ) as c:
        first = c.post("/v1/embeddings", json=body)
        second = c.post("/v1/embeddings", json=body)
    assert first.status_code == 200 and first.content == second.content
    assert served(orchestrator, "minilm") - before == 1


# --- who may see what ------------------------------------------------------------------------------


def test_bad_tokens_get_one_uniform_401_and_reach_no_worker(
    haif: Deployment,
    store_env: dict,  # noqa: C901
    orchestrator,
) -> None:  # noqa: ANN001
    acme, globex = new_tenant(store_env), new_tenant(store_env)
    good = new_token(store_env, acme)
    other = new_token(store_env, globex)
    revoked = new_token(store_env, acme)
    expiring = new_token(store_env, acme, "--expires-in", "1")
    with httpx.Client(base_url=haif.url, timeout=60) as c:

        def call(key: str | bytes) -> httpx.Response:
            return c.post(
                "/v1/completions",
                headers={
                    "Authorization": b"Bearer " + (key if isinstance(key, bytes) else key.encode())
                },
                json={"model": "echo", "prompt": "hi"},
            )

        assert call(revoked).status_code == 200 and call(expiring).status_code == 200
        haif_cli(store_env, "tokens", "revoke", revoked)
        start = time.monotonic()
        wait_for(
            lambda: call(revoked).status_code == 401, 10, 0.05, "the revoked token to stop working"
        )
        assert time.monotonic() - start < 1.0 + 1.5  # auth.token_cache_ttl_s is 1 s
        # The bound holds on every Gateway replica, not only the one that answered 401 first:
        # each caches its own answer for the TTL, so another may accept the token until then.
        time.sleep(max(0.0, start + 1.0 + 0.5 - time.monotonic()))
        assert [call(revoked).status_code for _ in range(8)] == [401] * 8
        wait_for(lambda: call(expiring).status_code == 401, 10, 0.1, "the token to expire")
        prefix, secret = good.split("_")[1], good.split("_", 2)[2]
        bad = [
            revoked,
            expiring,
            "malformed",
            "haif_" + "x" * 5000,
            good[:-2],
            f"haif_{'q' * 12}_{secret}",  # wrong prefix
            f"haif_{prefix}_{other.split('_', 2)[2]}",  # acme's prefix with globex's secret
            "' OR '1'='1' --",
            "haif_abc'--_x",
            "é".encode("latin-1") * 40,
            "ключ-ключ-ключ-ключ".encode(),
        ]
        before = served(orchestrator)
        for key in bad:
            resp = call(key)
            assert resp.status_code == 401, (key, resp.text)
            assert resp.json() == AUTH_BODY and "Traceback" not in resp.text
        assert served(orchestrator) == before  # no worker was called
        assert call(good).status_code == 200


def test_tenants_never_see_each_others_jobs_or_usage(haif: Deployment, store_env: dict, db) -> None:  # noqa: ANN001
    acme, globex = new_tenant(store_env), new_tenant(store_env)
    a = new_token(store_env, acme, "--scopes", "inference,admin")
    g = new_token(store_env, globex, "--scopes", "inference,admin")
    inference_only = new_token(store_env, acme)
    with httpx.Client(base_url=haif.url, timeout=60) as c:
        ha, hg = {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {g}"}
        job_id = c.post(
            "/v1/completions", headers=ha, json={"model": "echo", "prompt": "secret"}
        ).json()["id"]
        wait_for(
            lambda: c.get(f"/v1/jobs/{job_id}", headers=ha).json().get("state") == "succeeded", 10
        )
        mine = c.get(f"/v1/jobs/{job_id}", headers=ha).json()
        assert mine["model"] == "echo" and mine["prompt_tokens"] == 1
        foreign = c.get(f"/v1/jobs/{job_id}", headers=hg)
        missing = c.get("/v1/jobs/cmpl-00000000000000000000000000000000", headers=hg)
        assert foreign.status_code == missing.status_code == 404  # not 403: the id is not confirmed
        assert (
            foreign.json()["error"]["type"] == missing.json()["error"]["type"] == "not_found_error"
        )
        assert job_id in [j["id"] for j in c.get("/v1/jobs", headers=ha).json()["data"]]
        assert job_id not in [j["id"] for j in c.get("/v1/jobs", headers=hg).json()["data"]]
        wait_for(
            lambda: any(
                u["job_id"] == job_id for u in c.get("/v1/usage", headers=ha).json()["data"]
            ),
            10,
        )
        assert all(u["tenant"] == globex for u in c.get("/v1/usage", headers=hg).json()["data"])
        assert (
            c.get("/v1/usage", headers={"Authorization": f"Bearer {inference_only}"}).status_code
            == 403
        )


def test_scopes_and_model_allow_lists(haif: Deployment, store_env: dict) -> None:
    tenant = new_tenant(store_env)
    admin_only = new_token(store_env, tenant, "--scopes", "admin")
    echo_only = new_token(store_env, tenant, "--models", "echo")
    with httpx.Client(base_url=haif.url, timeout=60) as c:
        resp = c.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {admin_only}"},
            json={"model": "echo", "prompt": "x"},
        )
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
        h = {"Authorization": f"Bearer {echo_only}"}
        assert (
            c.post("/v1/embeddings", headers=h, json={"model": "minilm", "input": "x"}).status_code
            == 403
        )
        assert (
            c.post("/v1/completions", headers=h, json={"model": "echo", "prompt": "x"}).status_code
            == 200
        )
        assert [m["id"] for m in c.get("/v1/models", headers=h).json()["data"]] == ["echo"]


@pytest.mark.parametrize(
    ("headers", "path", "body"),
    [
        ({"Idempotency-Key": "x" * 300}, "/v1/completions", {"model": "echo", "prompt": "x"}),
        (
            {"Idempotency-Key": "'; DROP TABLE jobs; --"},
            "/v1/completions",
            {"model": "echo", "prompt": "x"},
        ),
        ({"Idempotency-Key": "clé"}, "/v1/completions", {"model": "echo", "prompt": "x"}),
        ({}, "/v1/completions", {"model": "echo'; DROP TABLE jobs; --", "prompt": "x"}),
        ({}, "/v1/completions", {"model": "écho-模型", "prompt": "x"}),
        (
            {},
            "/v1/chat/completions",
            {"model": "echo", "messages": [{"role": "user'--", "content": "x"}]},
        ),
    ],
)
def test_bad_input_in_headers_and_bodies_is_4xx(
    haif: Deployment, headers: dict, path: str, body: dict
) -> None:
    h = {"Authorization": f"Bearer {haif.api_key}"}
    with httpx.Client(base_url=haif.url, timeout=60) as c:
        resp = c.post(path, headers={**h, **{k: v.encode() for k, v in headers.items()}}, json=body)
        assert 400 <= resp.status_code < 500, resp.text
        assert "Traceback" not in resp.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/' OR 1=1 --",
        "/v1/jobs/%E2%82%AC%E2%82%AC",
        "/v1/jobs/" + "z" * 65,
        "/v1/usage?since=yesterday",
        "/v1/usage?since=0001-01-01T00:00:00%2B14:00",
        "/v1/usage?limit=-1",
        "/v1/jobs?limit=99999999999",
    ],
)
def test_bad_input_in_paths_and_queries_is_4xx(haif: Deployment, path: str) -> None:
    with httpx.Client(base_url=haif.url, timeout=60) as c:
        resp = c.get(path, headers={"Authorization": f"Bearer {haif.api_key}"})
        assert 400 <= resp.status_code < 500, resp.text


# --- the operator's side -----------------------------------------------------------------------


def test_usage_export_cli_jsonl_and_csv(haif: Deployment, store_env: dict, db) -> None:  # noqa: ANN001
    tenant = new_tenant(store_env)
    token = new_token(store_env, tenant)
    with httpx.Client(
        base_url=haif.url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as c:
        ids = [
            c.post(
                "/v1/completions", json={"model": "echo", "prompt": "a b c", "max_tokens": 2}
            ).json()["id"]
            for _ in range(3)
        ]
    wait_for(lambda: len(tenant_usage(db, tenant)) == 3, 30, what="3 usage records")
    lines = haif_cli(store_env, "usage", "export", "--tenant", tenant, "--since", "1h").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["job_id"] for r in rows] == ids
    assert set(rows[0]) == {
        "tenant",
        "model",
        "version",
        "job_id",
        "prompt_tokens",
        "completion_tokens",
        "started_at",
        "finished_at",
        "caller",
    }
    assert rows[0]["caller"].startswith("token:")  # who authenticated: this token
    assert (
        rows[0]["tenant"] == tenant
        and rows[0]["prompt_tokens"] == 3
        and rows[0]["completion_tokens"] == 2
    )
    table = list(
        csv.DictReader(
            io.StringIO(
                haif_cli(store_env, "usage", "export", "--tenant", tenant, "--format", "csv")
            )
        )
    )
    assert [r["job_id"] for r in table] == ids and table[0]["version"] == "1"
    assert haif_cli(store_env, "usage", "export", "--tenant", tenant, "--since", "2999-01-01") == ""


def test_billing_webhook_receives_every_record_once_after_failures(
    haif: Deployment, db, webhook
) -> None:  # noqa: ANN001
    with db.connect() as conn:
        expected = {r.job_id for r in conn.execute(select(UsageRecord.job_id))}
    assert expected
    wait_for(
        lambda: expected <= set(webhook.records()), 60, 0.2, "the webhook to receive all usage"
    )
    assert webhook.attempts > len(webhook.deliveries)  # it failed at first, and was retried
    for delivery, headers in zip(webhook.deliveries, webhook.headers, strict=True):
        assert headers.get("Idempotency-Key") == delivery["batch_id"]
    by_job = webhook.records()
    with db.connect() as conn:
        for row in conn.execute(select(UsageRecord.job_id, UsageRecord.prompt_tokens)):
            if row.job_id in by_job:
                assert by_job[row.job_id]["prompt_tokens"] == row.prompt_tokens


def test_dev_tenant_and_key_are_registered_hashed(haif: Deployment, store_env: dict, db) -> None:  # noqa: ANN001
    listing = [
        json.loads(line)
        for line in haif_cli(
            store_env, "tokens", "list", "--tenant", "default", "--json"
        ).splitlines()
    ]
    assert any(t["name"] == "development key" and t["scopes"] == "admin inference" for t in listing)
    with db.connect() as conn:
        stored = conn.execute(text("SELECT prefix, secret_hash FROM api_tokens")).all()
    assert all(haif.api_key not in (p, h) for p, h in stored)


def test_streams_are_marked_running_settled_and_billed(
    haif: Deployment, store_env: dict, db
) -> None:  # noqa: ANN001
    tenant = new_tenant(store_env)
    token = new_token(store_env, tenant, "--scopes", "inference,admin")
    h = {"Authorization": f"Bearer {token}"}
    body = {"model": "echo-slow", "prompt": "tok " * 30, "max_tokens": 30, "stream": True}  # ~1.5 s
    with httpx.Client(base_url=haif.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", headers=h, json=body) as resp:
            lines = resp.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            job_id = first["id"]
            # Longer than jobs.mark_running_after_s (0.5 s): the upkeep marks it running.
            wait_for(
                lambda: c.get(f"/v1/jobs/{job_id}", headers=h).json()["state"] == "running", 5, 0.05
            )
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}", headers=h).json()["state"] == "succeeded", 10)
        assert c.get(f"/v1/jobs/{job_id}", headers=h).json()["completion_tokens"] == 30
        # A client that hangs up is billed for what was generated, and its job fails. The
        # answer would take ~10 s: a loaded machine does not finish it before the hang-up.
        long = {**body, "prompt": "tok " * 200, "max_tokens": 200}
        with c.stream("POST", "/v1/completions", headers=h, json=long) as resp:
            lines = resp.iter_lines()
            cut = json.loads(next(line for line in lines if line.startswith("data: "))[6:])["id"]
        states: list[str] = []

        def failed() -> dict | None:
            job = c.get(f"/v1/jobs/{cut}", headers=h).json()
            states.append(job["state"])
            return job if job["state"] == "failed" else None

        try:
            job = wait_for(failed, 15, what="the job of a stream cut by its client to fail")
        except AssertionError as err:
            raise AssertionError(f"{err}; its states: {states[:2]} ... {states[-2:]}") from None
        assert 0 < job["completion_tokens"] < 200, (job, states[-3:])
    wait_for(
        lambda: {cut, job_id} <= {u[0] for u in tenant_usage(db, tenant)}, 10, what="stream usage"
    )
