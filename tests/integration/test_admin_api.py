"""The admin API end to end on the shared deployment: two Gateway replicas, PostgreSQL.

``auth.token_cache_ttl_s`` is 30 s in the integration config, so a revocation, a suspension
or a resumption seen by both replicas within a second can only have come by the auth
epoch the routing table carries, not by a cache running out.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from tests.support.deployment import Deployment, haif_cli
from tests.support.oidc_provider import AUDIENCE, OidcProvider
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

BURST = 16  # concurrent requests: Serve spreads them over both Gateway replicas
NOTICE_S = 1.0  # revocation and suspension reach every replica within this
SLACK_S = 1.0  # a loaded two-core machine's scheduling on top of it


def admin(haif: Deployment) -> httpx.Client:
    return httpx.Client(base_url=haif.url, headers=haif.headers(), timeout=60)


def new_tenant(c: httpx.Client, **fields: object) -> str:
    name = f"adm-{uuid.uuid4().hex[:10]}"
    resp = c.post("/admin/v1/tenants", json={"name": name, **fields})
    assert resp.status_code == 201, resp.text
    return name


def new_token(c: httpx.Client, tenant: str, scopes: list[str] | None = None) -> dict:
    resp = c.post("/admin/v1/tokens", json={"tenant": tenant, "scopes": scopes or ["inference"]})
    assert resp.status_code == 201, resp.text
    return resp.json()


def burst(url: str, token: str) -> list[int]:
    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            calls = [
                c.post("/v1/completions", headers={"Authorization": f"Bearer {token}"},
                       json={"model": "echo", "prompt": "hi", "max_tokens": 2})
                for _ in range(BURST)
            ]
            return [r.status_code for r in await asyncio.gather(*calls)]

    return asyncio.run(go())


def warm_both_replicas(c: httpx.Client, url: str, tenant: str, token: str) -> None:
    """Until both Gateway replicas have served (and so cached) the token."""
    def both() -> bool:
        assert set(burst(url, token)) == {200}
        jobs = c.get("/admin/v1/jobs", params={"tenant": tenant, "limit": 1000}).json()["data"]
        return len({j["gateway"] for j in jobs}) == 2

    wait_for(both, 60, 0.0, "both Gateway replicas to serve the token")


def refused_everywhere_within(url: str, token: str, status: int, since: float) -> float:
    """Seconds from ``since`` until a whole burst is refused with ``status``."""
    wait_for(lambda: set(burst(url, token)) == {status}, NOTICE_S + SLACK_S + 10, 0.0,
             f"every replica to answer {status}")
    return time.monotonic() - since


def test_a_token_made_over_http_serves_then_revocation_reaches_both_replicas_at_once(haif: Deployment) -> None:
    with admin(haif) as c:
        tenant = new_tenant(c, max_concurrent=100, priority="high")
        token = new_token(c, tenant)
        warm_both_replicas(c, haif.url, tenant, token["token"])
        start = time.monotonic()
        assert c.delete(f"/admin/v1/tokens/{token['id']}").json()["state"] == "revoked"
        took = refused_everywhere_within(haif.url, token["token"], 401, start)
        assert took < NOTICE_S + SLACK_S, took
        assert set(burst(haif.url, token["token"])) == {401}  # and it stays refused on both
        jobs = c.get("/admin/v1/jobs", params={"tenant": tenant}).json()["data"]
        assert {j["caller"] for j in jobs} == {f"token:{token['id']}"}  # jobs name the caller
        audit = c.get("/admin/v1/audit", params={"target": f"token:{token['id']}"}).json()["data"]
        assert [r["action"] for r in audit] == ["token.revoke", "token.create"]
        assert all(r["request_id"] and r["client"] and r["actor"].startswith("token:") for r in audit)
        assert token["token"] not in str(audit)


def test_a_suspended_tenant_is_refused_within_a_second_and_serves_again_once_resumed(haif: Deployment) -> None:
    with admin(haif) as c:
        tenant = new_tenant(c)
        token = new_token(c, tenant)["token"]
        warm_both_replicas(c, haif.url, tenant, token)
        start = time.monotonic()
        assert c.patch(f"/admin/v1/tenants/{tenant}", json={"suspended": True}).json()["suspended"] is True
        assert refused_everywhere_within(haif.url, token, 403, start) < NOTICE_S + SLACK_S
        resp = httpx.post(f"{haif.url}/v1/completions", headers={"Authorization": f"Bearer {token}"},
                          json={"model": "echo", "prompt": "hi"}, timeout=60)
        assert "suspended" in resp.json()["error"]["message"]
        start = time.monotonic()
        c.patch(f"/admin/v1/tenants/{tenant}", json={"suspended": False})
        wait_for(lambda: set(burst(haif.url, token)) == {200}, NOTICE_S + SLACK_S + 10, 0.0, "service again")
        assert time.monotonic() - start < NOTICE_S + SLACK_S
        actions = [r["action"] for r in c.get("/admin/v1/audit", params={"target": f"tenant:{tenant}"}).json()["data"]]
        assert actions == ["tenant.resume", "tenant.suspend", "tenant.create"]


def test_a_tenant_admin_acts_on_its_own_tenant_only(haif: Deployment) -> None:
    with admin(haif) as c:
        mine, theirs = new_tenant(c), new_tenant(c)
        other = new_token(c, theirs)
        boss = new_token(c, mine, ["tenant_admin"])["token"]
    with httpx.Client(base_url=haif.url, headers={"Authorization": f"Bearer {boss}"}, timeout=60) as t:
        for method, path, kwargs in (
            ("GET", "/admin/v1/tokens", {"params": {"tenant": theirs}}),
            ("GET", "/admin/v1/usage", {"params": {"tenant": theirs}}),
            ("GET", "/admin/v1/jobs", {"params": {"tenant": theirs}}),
            ("POST", "/admin/v1/tokens", {"json": {"tenant": theirs}}),
            ("POST", "/admin/v1/tokens", {"json": {"tenant": mine, "scopes": ["admin"]}}),
            ("GET", "/admin/v1/tenants", {}),
            ("GET", "/admin/v1/audit", {}),
            ("GET", "/admin/v1/workers", {}),
            ("PATCH", f"/admin/v1/tenants/{mine}", {"json": {"suspended": True}}),
        ):
            resp = t.request(method, path, **kwargs)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.json()["error"]["type"] == "permission_error"
        assert t.delete(f"/admin/v1/tokens/{other['id']}").status_code == 404  # as if absent
        made = t.post("/admin/v1/tokens", json={"tenant": mine})
        assert made.status_code == 201
        assert {tok["tenant"] for tok in t.get("/admin/v1/tokens").json()["data"]} == {mine}
        assert t.get("/admin/v1/usage").status_code == 200
    # A plain inference key is not an admin at all.
    plain = made.json()["token"]
    resp = httpx.get(f"{haif.url}/admin/v1/tokens", headers={"Authorization": f"Bearer {plain}"}, timeout=60)
    assert resp.status_code == 403
    assert httpx.get(f"{haif.url}/admin/v1/tokens", timeout=60).status_code == 401


def test_fleet_views_pages_and_the_usage_export(haif: Deployment) -> None:
    with admin(haif) as c:
        models = {m["model"]: m for m in c.get("/admin/v1/models").json()["data"]}
        assert models["echo"]["versions"]["1"]["workers"].get("ready", 0) >= 1
        workers = c.get("/admin/v1/workers", params={"model": "echo"}).json()["data"]
        assert workers and all(w["model"] == "echo" for w in workers)
        assert c.post("/admin/v1/workers/no%2Fsuch%23worker/drain").status_code == 404
        assert c.get("/admin/v1/rollouts/echo").json()["weights"] == {"1": 100}
        assert c.get("/admin/v1/rollouts/nope").status_code == 404
        tenant = new_tenant(c)
        ids = [new_token(c, tenant)["id"] for _ in range(5)]
        seen, cursor = [], None
        while True:
            page = c.get("/admin/v1/tokens", params={"tenant": tenant, "limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [t["id"] for t in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids
        assert c.get("/admin/v1/tokens", params={"cursor": "forged"}).status_code == 400
        token = new_token(c, tenant)["token"]
        assert set(burst(haif.url, token)) == {200}
        wait_for(lambda: len(c.get("/admin/v1/usage", params={"tenant": tenant}).json()["data"]) == BURST,
                 30, 0.2, "the usage records")
        lines = c.get("/admin/v1/usage", params={"tenant": tenant, "format": "ndjson"})
        assert lines.headers["content-type"].startswith("application/x-ndjson")
        assert len(lines.text.splitlines()) == BURST
        assert c.get("/admin/v1/dlq", params={"limit": 5}).status_code == 200
        assert "/admin/v1/tenants" in c.get("/openapi.json").json()["paths"]


def test_a_jwt_of_the_trusted_issuer_serves_administers_and_follows_suspension(
    haif: Deployment, oidc_issuer: OidcProvider
) -> None:
    """The real provider's client-credentials JWTs, beside HAIF keys: inference, the admin
    API, the caller on the job, a suspension within a second; another audience is refused."""
    with admin(haif) as c:
        resp = c.post("/admin/v1/tenants", json={"name": "globex"})  # provider.js: client tenant-b
        assert resp.status_code in (201, 409), resp.text
        c.patch("/admin/v1/tenants/globex", json={"suspended": False})
        jwt_token = oidc_issuer.token("tenant-b", AUDIENCE, "haif:inference haif:admin")
        assert set(burst(haif.url, jwt_token)) == {200}
        jobs = c.get("/admin/v1/jobs", params={"tenant": "globex", "limit": 1}).json()["data"]
        assert jobs[0]["caller"] == f"oidc:{oidc_issuer.issuer}#tenant-b"
        as_jwt = {"Authorization": f"Bearer {jwt_token}"}
        assert httpx.get(f"{haif.url}/admin/v1/tenants", headers=as_jwt, timeout=60).status_code == 200
        wrong = oidc_issuer.token("tenant-b", "https://elsewhere.test/api")
        assert set(burst(haif.url, wrong)) == {401}
        unknown = oidc_issuer.token("unknown", AUDIENCE)  # a tenant HAIF does not have
        assert set(burst(haif.url, unknown)) == {403}
        start = time.monotonic()
        c.patch("/admin/v1/tenants/globex", json={"suspended": True})
        try:
            assert refused_everywhere_within(haif.url, jwt_token, 403, start) < NOTICE_S + SLACK_S
        finally:
            c.patch("/admin/v1/tenants/globex", json={"suspended": False})
        audit = c.get("/admin/v1/audit", params={"action": "tenant.create", "target": "tenant:globex"}).json()
        assert audit["data"]


def test_the_cli_over_http_needs_no_database(haif: Deployment, store_env: dict) -> None:
    """Every operator command with HAIF_URL and HAIF_TOKEN alone: the database the config
    names is unreachable, and each change still leaves its audit row (actor: the token)."""
    with admin(haif) as c:
        ops = new_token(c, new_tenant(c), ["admin"])
    env = {
        "HAIF_URL": haif.url, "HAIF_TOKEN": ops["token"],
        "HAIF_DATABASE__URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",  # nothing listens
        "HAIF_REDIS__URL": "redis://127.0.0.1:1/0",
    }
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    haif_cli(env, "tenants", "create", tenant, "--requests-per-minute", "100", "--priority", "low")
    assert tenant in haif_cli(env, "tenants", "list", "--json")
    assert '"priority": "low"' in haif_cli(env, "tenants", "show", tenant, "--json")
    haif_cli(env, "quotas", "set", "--tenant", tenant, "--tokens-per-day", "5000")
    token = haif_cli(env, "tokens", "create", "--tenant", tenant).strip().splitlines()[-1]
    answers: list[int] = []  # every answer to the token: its 200s are the usage to find

    def answered(status: int) -> bool:
        answers.extend(burst(haif.url, token))
        return set(answers[-BURST:]) == {status}

    assert answered(200)
    listed = [json.loads(line) for line in haif_cli(env, "tokens", "list", "--tenant", tenant, "--json").splitlines()]
    assert len(listed) == 1 and token not in str(listed)
    haif_cli(env, "tenants", "suspend", tenant)
    wait_for(lambda: answered(403), NOTICE_S + SLACK_S + 10, 0.0, "the suspension")
    haif_cli(env, "tenants", "resume", tenant)
    haif_cli(env, "tokens", "revoke", token)
    wait_for(lambda: answered(401), NOTICE_S + SLACK_S + 10, 0.0, "the revocation")
    served = answers.count(200)  # a burst sent as the suspension arrived may be partly served

    def exported() -> list[dict]:
        return [json.loads(line) for line in haif_cli(env, "usage", "export", "--tenant", tenant).splitlines()]

    rows = wait_for(lambda: (found := exported()) and len(found) == served and found, 30, 0.2, "the usage records")
    assert {r["tenant"] for r in rows} == {tenant}
    assert "echo" in haif_cli(env, "rollout", "list")
    assert "echo/" in haif_cli(env, "workers", "list", "--model", "echo")
    haif_cli(env, "dlq", "list")
    haif_cli(env, "jobs", "list", "--tenant", tenant)
    key = "ab" * 32
    haif_cli(env, "p2p", "peers", "add", key, "--tenant", tenant)
    assert key in haif_cli(env, "p2p", "peers", "list")
    haif_cli(env, "p2p", "peers", "remove", key)
    audit = [json.loads(line) for line in haif_cli(env, "audit", "list", "--actor", f"token:{ops['id']}", "--json").splitlines()]
    assert {"tenant.create", "tenant.update", "tenant.suspend", "tenant.resume", "token.create", "token.revoke",
            "peer.add", "peer.remove"} <= {r["action"] for r in audit}
    # The database is not reachable from here: the same command without HAIF_URL fails.
    direct = {k: v for k, v in env.items() if k not in ("HAIF_URL", "HAIF_TOKEN")}
    with pytest.raises(AssertionError, match="failed"):
        haif_cli(direct, "tenants", "list")


def test_admin_bootstrap_prints_a_working_admin_token_once(haif: Deployment, store_env: dict) -> None:
    tenant = f"ops-{uuid.uuid4().hex[:8]}"
    out = haif_cli(store_env, "admin", "bootstrap", "--tenant", tenant)
    token = out.strip().splitlines()[-1]
    resp = httpx.get(f"{haif.url}/admin/v1/tenants/{tenant}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["name"] == tenant
    with admin(haif) as c:
        actions = [r["action"] for r in c.get("/admin/v1/audit", params={"target": f"tenant:{tenant}"}).json()["data"]]
    assert actions == ["tenant.create"]
