"""The operator plane: JWT callers, revocation across Gateway replicas, admin API pages.

One deployment, in this script: the echo model, tenancy on a fresh PostgreSQL database,
two Gateway replicas (``server.gateway_replicas: 2``), the development key (admin scope)
and ``HAIF_AUTH__OIDC`` trusting a real OpenID provider started here
(tests/support/oidc_provider.py; its client ``tenant-a`` carries the tenant ``acme``,
which the benchmark creates over the admin API). Measured, each against a baseline of the
same run:

* a JWT access token of the provider (its key set cached by the Gateway) against the same
  request with a HAIF API key of the same tenant: p50 latency at concurrency 1, requests
  to the two in turn, one by one, over interleaved rounds; the difference in ms too;
* revocation: for each of ``--revocations`` tokens, made over the admin API and served by
  both Gateway replicas (bursts until the tenant's jobs name both), the time from the
  ``DELETE`` until a whole burst of concurrent requests with it is refused (401), p50 and
  p99; the baseline is ``auth.token_cache_ttl_s`` (30 s here), the bound a revocation
  would have without the auth epoch's notice to every replica;
* a page of 1,000 tokens (``GET /admin/v1/tokens?limit=1000`` at a random cursor) with
  ``--tokens`` rows stored (inserted into PostgreSQL in one statement), against the admin
  API's smallest page (``GET /admin/v1/tenants?limit=1``) on the same deployment, the two
  in turn, one by one.

Run from the repository root: ``python -m bench.admin`` (under ``flock /tmp/haif-it.lock``
where integration tests share the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Row, percentile, print_table, round_ratios, write_results
from bench.overhead import _bench_database, _latencies

BENCH = "admin"
PORT = 8333
API_KEY = "bench-admin-key-0123456789abcdef"
TENANT = "acme"  # the haif_tenant claim of the provider's client "tenant-a"
CLIENT = "tenant-a"
TOKEN_CACHE_TTL_S = 30.0
BURST = 16  # concurrent requests: Serve spreads them over both Gateway replicas
PAGE = 1000


def _config(database_url: str, issuer: str) -> Any:
    from haif.config import HaifConfig
    from haif.config.loading import apply_env_overrides
    from tests.support.oidc_provider import AUDIENCE

    data: dict[str, Any] = {
        "server": {"port": PORT, "state_dir": ".haif/bench-admin", "app_name": "haif", "gateway_replicas": 2},
        "auth": {"dev_api_key": API_KEY, "backend": "database", "token_cache_ttl_s": TOKEN_CACHE_TTL_S},
        "database": {"url": database_url},
        "quotas": {"rate_limit_backend": "database"},
        "models": [{"name": "echo", "runtime": "echo", "device": "cpu", "num_cpus": 0.1}],
    }
    oidc = [{"issuer": issuer, "audience": AUDIENCE, "tenant_claim": "haif_tenant"}]
    return HaifConfig.model_validate(apply_env_overrides(data, {"HAIF_AUTH__OIDC": json.dumps(oidc)}))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _checked(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
    if resp.status_code != status:
        raise RuntimeError(f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text[:300]}")
    return resp.json()


# --- 1. a JWT bearer against a HAIF key --------------------------------------------------


async def _jwt_latency(
    client: httpx.AsyncClient, base: str, provider: Any, key: str, rounds: int, n: int
) -> dict[str, Any]:
    from tests.support.oidc_provider import AUDIENCE

    url = f"{base}/v1/completions"
    lat: dict[str, list[float]] = {"jwt": [], "key": []}
    round_p50: dict[str, list[float]] = {"jwt": [], "key": []}
    for _ in range(rounds):
        # A fresh access token each round (the provider's live 10 minutes); its first
        # request is not measured, nor is the key's.
        jwt_token = await asyncio.to_thread(provider.token, CLIENT, AUDIENCE, "haif:inference")
        headers = {"jwt": _bearer(jwt_token), "key": _bearer(key)}
        for auth in headers.values():
            await _latencies(client, url, 20, auth)
        this_round: dict[str, list[float]] = {"jwt": [], "key": []}
        for _ in range(n):
            for name in ("jwt", "key"):
                this_round[name] += await _latencies(client, url, 1, headers[name])
        for name, values in this_round.items():
            lat[name] += values
            round_p50[name].append(percentile(values, 50))
    return {"lat": lat, "round_p50": round_p50}


# --- 2. revocation seen by every replica -------------------------------------------------


async def _burst(client: httpx.AsyncClient, base: str, token: str, n: int = BURST) -> list[int]:
    body = {"model": "echo", "prompt": "hi", "max_tokens": 2}
    calls = [client.post(f"{base}/v1/completions", json=body, headers=_bearer(token)) for _ in range(n)]
    return [r.status_code for r in await asyncio.gather(*calls)]


async def _warm_both_replicas(client: httpx.AsyncClient, base: str, token: dict[str, Any]) -> int:
    """Bursts until the tenant's jobs show both Gateway replicas serving ``token``; the
    bursts it took."""
    caller = f"token:{token['id']}"
    deadline = time.monotonic() + 60
    bursts = 0
    while time.monotonic() < deadline:
        statuses = await _burst(client, base, token["token"])
        bursts += 1
        if set(statuses) != {200}:
            raise RuntimeError(f"warm-up: {statuses}")
        jobs = await _checked(await client.get(f"{base}/admin/v1/jobs", params={"tenant": TENANT, "limit": 200},
                                               headers=_bearer(API_KEY)))
        if len({j["gateway"] for j in jobs["data"] if j["caller"] == caller}) >= 2:
            return bursts
    raise RuntimeError("both Gateway replicas did not serve the token within 60 s")


async def _revocations(client: httpx.AsyncClient, base: str, n: int) -> dict[str, Any]:
    seen_ms: list[float] = []
    # The start of the burst that was all 401: the other bound (seen_ms holds that burst).
    seen_from_ms: list[float] = []
    delete_ms: list[float] = []
    bursts_after: list[int] = []
    warm_bursts: list[int] = []
    for _ in range(n):
        token = await _checked(await client.post(f"{base}/admin/v1/tokens", headers=_bearer(API_KEY),
                                                 json={"tenant": TENANT, "scopes": ["inference"]}), 201)
        warm_bursts.append(await _warm_both_replicas(client, base, token))
        start = time.perf_counter()
        revoked = await _checked(await client.delete(f"{base}/admin/v1/tokens/{token['id']}",
                                                     headers=_bearer(API_KEY)))
        delete_ms.append((time.perf_counter() - start) * 1000)
        if revoked["state"] != "revoked":
            raise RuntimeError(f"DELETE answered {revoked}")
        tries = 0
        while True:
            burst_start = time.perf_counter()
            statuses = await _burst(client, base, token["token"])
            tries += 1
            if set(statuses) == {401}:
                break
            if not set(statuses) <= {200, 401}:
                raise RuntimeError(f"after the revocation: {statuses}")
            if time.perf_counter() - start > TOKEN_CACHE_TTL_S + 10:
                raise RuntimeError("the revoked token still served after the cache TTL")
        seen_ms.append((time.perf_counter() - start) * 1000)
        seen_from_ms.append((burst_start - start) * 1000)
        bursts_after.append(tries)
    return {"seen_ms": seen_ms, "seen_from_ms": seen_from_ms, "delete_ms": delete_ms,
            "bursts_after": bursts_after, "warm_bursts": warm_bursts}


# --- 3. a page of 1,000 tokens among many --------------------------------------------------


def _bulk_tokens(database_url: str, n: int) -> tuple[int, int, float]:
    """``n`` tokens of the tenant in one statement; their first and last ids, and the
    seconds the insert (and ANALYZE) took."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    start = time.perf_counter()
    with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                         dbname=url.database, autocommit=True) as conn:
        (tenant_id,) = conn.execute("SELECT id FROM tenants WHERE name = %s", (TENANT,)).fetchone()
        first, last = conn.execute(
            """
            WITH made AS (
                INSERT INTO api_tokens (tenant_id, prefix, secret_hash, name, scopes, created_at)
                SELECT %s, 'bench-' || g, md5(g::text) || md5('x' || g::text), 'bulk ' || g, 'inference', now()
                FROM generate_series(1, %s) AS g
                RETURNING id
            )
            SELECT min(id), max(id) FROM made
            """,
            (tenant_id, n),
        ).fetchone()
        conn.execute("ANALYZE api_tokens")
    return first, last, time.perf_counter() - start


async def _pages(
    client: httpx.AsyncClient, base: str, first: int, last: int, rounds: int, n: int
) -> dict[str, Any]:
    from haif.admin import pages

    rng = random.Random(7)
    targets = {
        "page": lambda: (f"{base}/admin/v1/tokens",
                         {"limit": PAGE, "cursor": pages.encode(rng.randint(first - 1, last - PAGE))}),
        "small": lambda: (f"{base}/admin/v1/tenants", {"limit": 1}),
    }
    headers = _bearer(API_KEY)
    sizes: list[int] = []

    async def one(name: str) -> float:
        url, params = targets[name]()
        start = time.perf_counter()
        resp = await client.get(url, params=params, headers=headers)
        took = (time.perf_counter() - start) * 1000
        data = (await _checked(resp))["data"]
        if name == "page":
            if len(data) != PAGE:
                raise RuntimeError(f"a page of {len(data)} tokens")
            sizes.append(len(resp.content))
        return took

    for name in targets:  # warm-up
        for _ in range(5):
            await one(name)
    lat: dict[str, list[float]] = {k: [] for k in targets}
    round_p50: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(rounds):
        this_round: dict[str, list[float]] = {k: [] for k in targets}
        for _ in range(n):
            for name in targets:
                this_round[name].append(await one(name))
        for name, values in this_round.items():
            lat[name] += values
            round_p50[name].append(percentile(values, 50))
    return {"lat": lat, "round_p50": round_p50, "page_bytes": percentile(sizes, 50)}


async def _measure(base: str, provider: Any, database_url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=BURST * 2, max_keepalive_connections=BURST * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        created = await client.post(f"{base}/admin/v1/tenants", json={"name": TENANT}, headers=_bearer(API_KEY))
        await _checked(created, 201)
        key = (await _checked(await client.post(f"{base}/admin/v1/tokens", headers=_bearer(API_KEY),
                                                json={"tenant": TENANT, "scopes": ["inference"]}), 201))["token"]
        print("JWT against a HAIF key ...", flush=True)
        jwt = await _jwt_latency(client, base, provider, key, args.rounds, args.latency_requests)
        print(f"{args.revocations} revocations ...", flush=True)
        revocations = await _revocations(client, base, args.revocations)
        print(f"{args.tokens} tokens into PostgreSQL ...", flush=True)
        first, last, insert_s = await asyncio.to_thread(_bulk_tokens, database_url, args.tokens)
        print(f"  inserted in {insert_s:.1f} s; pages ...", flush=True)
        page = await _pages(client, base, first, last, args.rounds, args.pages)
    return {"jwt": jwt, "revocations": revocations, "pages": page, "insert_s": insert_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-requests", type=int, default=100, help="per target and round")
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens stored for the page test")
    parser.add_argument("--pages", type=int, default=40, help="pages (and baseline requests) per round")
    args = parser.parse_args()

    import ray
    from ray import serve

    from haif.ingress import wait_ready
    from serve_app import deploy
    from tests.support.oidc_provider import OidcProvider

    base = f"http://127.0.0.1:{PORT}"
    ray.init(address="local", namespace="haif-bench", include_dashboard=False, log_to_driver=False)
    with _bench_database() as database_url, tempfile.TemporaryDirectory(prefix="haif-bench-oidc-") as workdir:
        provider = OidcProvider(Path(workdir))
        provider.start()
        try:
            config = deploy(_config(database_url, provider.issuer))
            wait_ready(base, timeout_s=300)
            data = asyncio.run(_measure(base, provider, database_url, args))
        finally:
            serve.shutdown()
            ray.shutdown()
            provider.stop()

    lat, round_p50 = data["jwt"]["lat"], data["jwt"]["round_p50"]
    jwt_p50, key_p50 = percentile(lat["jwt"], 50), percentile(lat["key"], 50)
    added = [j - k for j, k in zip(round_p50["jwt"], round_p50["key"], strict=True)]
    with_key = "the same request with a HAIF key"
    rev = data["revocations"]
    seen = rev["seen_ms"]
    per_round = max(1, len(seen) // args.rounds)
    rev_rounds = [seen[i:i + per_round] for i in range(0, len(seen), per_round)]
    ttl_ms = TOKEN_CACHE_TTL_S * 1000
    ttl_name = "auth.token_cache_ttl_s (the bound without the notice)"
    pg = data["pages"]
    small = "GET /admin/v1/tenants?limit=1, same deployment"
    rows = [
        Row(BENCH, "latency p50 ms (c=1), JWT bearer (JWKS cached)", jwt_p50, key_p50, with_key, False,
            "<= +0.5 ms", round_ratios(round_p50["jwt"], round_p50["key"])),
        # The difference itself: haif is the ms a JWT adds, the ratio that share of the key's p50.
        Row(BENCH, "p50 ms a JWT bearer adds (c=1)", jwt_p50 - key_p50, key_p50, f"{with_key} (its p50)", False,
            "<= 0.5 ms", (min(added) / key_p50, max(added) / key_p50)),
        Row(BENCH, "latency p99 ms (c=1), JWT bearer (JWKS cached)", percentile(lat["jwt"], 99),
            percentile(lat["key"], 99), with_key, False),
        Row(BENCH, f"revocation seen by every replica, p99 ms over {len(seen)} revocations", percentile(seen, 99),
            ttl_ms, ttl_name, False, "<= 1000 ms", round_ratios([percentile(r, 99) for r in rev_rounds],
                                                                  [ttl_ms] * len(rev_rounds))),
        Row(BENCH, f"revocation seen by every replica, p50 ms over {len(seen)} revocations", percentile(seen, 50),
            ttl_ms, ttl_name, False, "", round_ratios([percentile(r, 50) for r in rev_rounds],
                                                      [ttl_ms] * len(rev_rounds))),
        Row(BENCH, f"admin API: a page of 1,000 tokens, p50 ms, {args.tokens:,} tokens stored",
            percentile(pg["lat"]["page"], 50), percentile(pg["lat"]["small"], 50), small, False, "<= 50 ms",
            round_ratios(pg["round_p50"]["page"], pg["round_p50"]["small"])),
        Row(BENCH, f"admin API: a page of 1,000 tokens, p99 ms, {args.tokens:,} tokens stored",
            percentile(pg["lat"]["page"], 99), percentile(pg["lat"]["small"], 99), small, False),
    ]
    extra = {
        "p50 ms a JWT adds, per round": added,
        "revocation: DELETE round trip p50 ms": percentile(rev["delete_ms"], 50),
        "revocation: seen p50/p90/p99/max ms": [percentile(seen, p) for p in (50, 90, 99, 100)],
        "revocation: start of the all-401 burst p50/p99 ms (the lower bound)":
            [percentile(rev["seen_from_ms"], p) for p in (50, 99)],
        "revocation: bursts after the DELETE until all 401 (max)": max(rev["bursts_after"]),
        "revocation: bursts to warm both replicas (max)": max(rev["warm_bursts"]),
        "revocation: burst size (concurrent requests)": BURST,
        "tokens inserted, s (one INSERT ... SELECT, ANALYZE)": data["insert_s"],
        "page of 1,000 tokens, bytes (p50)": pg["page_bytes"],
    }
    print_table(f"admin: the operator plane ({config.server.gateway_replicas} Gateway replicas, "
                f"{args.rounds} rounds)", rows)
    print()
    for name, value in extra.items():
        print(f"  {name:<56} {value}")
    (path := write_results(BENCH, rows)).with_name("admin_details.json").write_text(
        json.dumps(extra, indent=2) + "\n"
    )
    print(f"\nwrote {path}")
    print(json.dumps([r.to_json() for r in rows]))


if __name__ == "__main__":
    main()
