"""Gateway admission on the embedded store (SQLite): tokens, scopes, quotas, idempotency, settlement."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from haif.config import HaifConfig
from haif.envelope import RequestContext, build_work_item
from haif.exceptions import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from haif.gateway.auth import AUTH_FAILED_MESSAGE, DatabaseAuthenticator
from haif.gateway.quota import reservation_tokens
from haif.protocol import CompletionRequest, EmbeddingRequest
from haif.store import Database
from haif.store.ledger import usage_total
from haif.store.models import ApiToken, Job
from haif.store.quotas import QuotaLimits
from haif.store.tokens import TokenRepository
from tests.support.admission import Clock, admission, answer, item, make_tenant
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.unit

MODELS = {"models": [{"name": "echo", "runtime": "echo"}, {"name": "other", "runtime": "echo"}]}


@pytest.fixture
def config(tmp_path: Path) -> HaifConfig:
    return sqlite_config(tmp_path, **MODELS)


# --- authentication -----------------------------------------------------------------------------


async def test_every_bad_key_gets_the_same_401_and_one_lookup_per_key(
    config: HaifConfig, sqlite_db: Database
) -> None:
    _, good = make_tenant(sqlite_db, "acme")
    _, other = make_tenant(sqlite_db, "globex")
    _, expired = make_tenant(sqlite_db, "initech", expires_in_s=1)
    _, revoked = make_tenant(sqlite_db, "umbrella")
    with sqlite_db.session() as s:
        TokenRepository(s).revoke(revoked)
    prefix_of_good = good.split("_")[1]
    bad = [
        None,
        "",
        "x",
        "Bearer",
        "haif_",
        "a" * 5000,
        "héllo-wörld-0123456789",
        "' OR 1=1 --",
        "haif_short_x",
        "haif_" + "z" * 12 + "_" + "A" * 43,  # well formed, unknown prefix
        f"haif_{prefix_of_good}_{other.split('_', 2)[2]}",  # acme's prefix, globex's secret
        good[:-1] + ("A" if good[-1] != "A" else "B"),  # one character off
        revoked,
    ]
    auth = DatabaseAuthenticator(sqlite_db, ttl_s=5, max_entries=100)
    with sqlite_db.session() as s:  # make the expired one expired
        s.execute(
            ApiToken.__table__.update()
            .where(ApiToken.prefix == expired.split("_")[1])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )

    async def run() -> None:
        for key in [*bad, expired]:
            with pytest.raises(AuthenticationFailed) as info:
                await auth.authenticate(key)
            assert info.value.to_body() == {
                "error": {
                    "message": AUTH_FAILED_MESSAGE,
                    "type": "authentication_error",
                    "code": "invalid_api_key",
                }
            }
        principal = await auth.authenticate(good)
        assert principal.tenant == "acme" and principal.scopes == {"inference"}
        lookups = auth.lookups
        await asyncio.gather(*(auth.authenticate(good) for _ in range(50)))
        assert auth.lookups == lookups  # cached

    await run()
    # Malformed keys never reached the database.
    assert auth.lookups < len(bad) + 2


async def test_revocation_takes_effect_within_the_cache_ttl(
    config: HaifConfig, sqlite_db: Database
) -> None:
    _, token = make_tenant(sqlite_db, "acme")
    clock = Clock()
    auth = DatabaseAuthenticator(sqlite_db, ttl_s=2.0, max_entries=100, clock=clock)

    async def run() -> None:
        await auth.authenticate(token)
        with sqlite_db.session() as s:
            TokenRepository(s).revoke(token)
        clock.now += 1.9
        await auth.authenticate(token)  # still cached: within the bound
        clock.now += 0.2
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(token)

    await run()


async def test_concurrent_first_use_of_a_key_is_one_lookup(sqlite_db: Database) -> None:
    _, token = make_tenant(sqlite_db, "acme")
    auth = DatabaseAuthenticator(sqlite_db, ttl_s=5, max_entries=100)

    async def run() -> None:
        await asyncio.gather(*(auth.authenticate(token) for _ in range(100)))

    await run()
    assert auth.lookups == 1


# --- scopes, models, quotas -----------------------------------------------------------------------


async def test_scopes_and_allowed_models(config: HaifConfig, sqlite_db: Database) -> None:
    _, admin_only = make_tenant(sqlite_db, "a", scopes=("admin",))
    _, echo_only = make_tenant(sqlite_db, "b", allowed_models=["echo"])
    _, anything = make_tenant(sqlite_db, "c")
    adm = admission(config, sqlite_db)

    async def run() -> None:
        with pytest.raises(PermissionDenied, match="inference"):
            await adm.admit(item(config, admin_only))
        with pytest.raises(PermissionDenied, match="other"):
            await adm.admit(item(config, echo_only, model="other"))
        with pytest.raises(ModelNotFound):
            await adm.admit(item(config, anything, model="nope"))
        ticket = await adm.admit(item(config, echo_only))
        assert ticket.job_id.startswith("cmpl-") and ticket.item.ctx.api_key is None
        assert ticket.item.ctx.principal.tenant == "b"

    await run()
    assert adm.metrics.counts["forbidden"] == 2


async def test_requests_per_minute_exact_under_concurrency(
    config: HaifConfig, sqlite_db: Database
) -> None:
    tenant_id, token = make_tenant(sqlite_db, "acme", QuotaLimits(requests_per_minute=7))
    adm = admission(config, sqlite_db)

    async def one() -> str:
        try:
            ticket = await adm.admit(item(config, token))
        except RateLimited as exc:
            assert exc.headers()["Retry-After"].isdigit()
            return "429"
        await adm.succeed(ticket, 3, 2, answer("echo", ticket.job_id))
        return "200"

    async def run() -> list[str]:
        out = await asyncio.gather(*(one() for _ in range(30)))
        await asyncio.gather(*adm._settling)  # settlements that run after their response
        return out

    results = await run()
    assert results.count("200") == 7 and results.count("429") == 23
    with sqlite_db.connect() as conn:
        assert usage_total(conn, tenant_id) == (7, 21, 14)


async def test_tokens_reserved_refunded_and_slot_released_on_failure(
    config: HaifConfig, sqlite_db: Database
) -> None:
    limits = QuotaLimits(tokens_per_minute=1000, max_concurrent=1)
    tenant_id, token = make_tenant(sqlite_db, "acme", limits)
    adm = admission(config, sqlite_db)

    async def run() -> None:
        ticket = await adm.admit(item(config, token))
        with pytest.raises(RateLimited, match="concurrent"):
            await adm.admit(item(config, token))
        await adm.fail(ticket, RuntimeError("worker died"))
        ticket = await adm.admit(item(config, token))  # the slot is free again
        await adm.succeed(ticket, 3, 2, answer("echo", ticket.job_id))

    await run()
    with sqlite_db.connect() as conn:
        assert usage_total(conn, tenant_id) == (1, 3, 2)  # the failed job is not billed
        states = sorted(
            r.state for r in conn.execute(select(Job.state).where(Job.tenant_id == tenant_id))
        )
    assert states == ["failed", "succeeded"]


def test_reservation_covers_prompt_estimate_and_every_prompt() -> None:
    cfg = HaifConfig(**MODELS)
    body = CompletionRequest(model="echo", prompt=["abcd" * 10, "efgh" * 10], max_tokens=5)
    work = build_work_item(
        "completion", body, RequestContext.new(timeout_s=5, api_key=None), cfg.limits
    )
    assert reservation_tokens(work, 4.0) == 20 + 2 * 5
    emb = EmbeddingRequest(model="echo", input=["abcd" * 3])
    work = build_work_item(
        "embedding", emb, RequestContext.new(timeout_s=5, api_key=None), cfg.limits
    )
    assert reservation_tokens(work, 4.0) == 3


# --- idempotency ---------------------------------------------------------------------------------


async def test_concurrent_duplicates_execute_once_and_get_the_same_answer(
    config: HaifConfig, sqlite_db: Database
) -> None:
    tenant_id, token = make_tenant(sqlite_db, "acme")
    adm = admission(config, sqlite_db)
    executions = 0

    async def one() -> str:
        nonlocal executions
        ticket = await adm.admit(item(config, token, idem="order-42"))
        if ticket.replay is not None:
            return ticket.replay.model_dump_json()
        executions += 1
        await asyncio.sleep(0.05)  # the work
        response = answer("echo", ticket.job_id)
        await adm.succeed(ticket, 3, 2, response)
        return response.model_dump_json()

    async def run() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(20)))

    answers = await run()
    assert executions == 1 and len(set(answers)) == 1
    with sqlite_db.connect() as conn:
        assert usage_total(conn, tenant_id) == (1, 3, 2)

    async def later() -> None:
        replay = await adm.admit(item(config, token, idem="order-42"))
        assert replay.replay.model_dump_json() == answers[0]
        with pytest.raises(Conflict):
            await adm.admit(item(config, token, idem="order-42", prompt="something else"))

    await later()


@pytest.mark.parametrize("key", ["", "x" * 256, "clé-été", "has space", "tab\there"])
async def test_bad_idempotency_keys_are_400(config: HaifConfig, sqlite_db: Database, key: str) -> None:
    _, token = make_tenant(sqlite_db, "acme")
    adm = admission(config, sqlite_db)
    with pytest.raises(InvalidRequest, match="Idempotency-Key"):
        await adm.admit(item(config, token, idem=key))


async def test_streams_cannot_carry_an_idempotency_key(config: HaifConfig, sqlite_db: Database) -> None:
    _, token = make_tenant(sqlite_db, "acme")
    with pytest.raises(InvalidRequest, match="stream"):
        await admission(config, sqlite_db).admit(item(config, token, idem="k", stream=True))


async def test_a_tenant_sees_only_its_own_jobs_and_usage(config: HaifConfig, sqlite_db: Database) -> None:
    _, acme = make_tenant(sqlite_db, "acme", scopes=("inference", "admin"))
    _, globex = make_tenant(sqlite_db, "globex", scopes=("inference", "admin"))
    adm = admission(config, sqlite_db)

    async def run() -> None:
        ticket = await adm.admit(item(config, acme))
        await adm.succeed(ticket, 3, 2, answer("echo", ticket.job_id))
        await asyncio.gather(*adm._settling)
        ctx_a = RequestContext.new(timeout_s=5, api_key=acme)
        ctx_g = RequestContext.new(timeout_s=5, api_key=globex)
        assert (await adm.job(ctx_a, ticket.job_id))["state"] == "succeeded"
        with pytest.raises(NotFound):
            await adm.job(ctx_g, ticket.job_id)  # 404, exactly as for an id that does not exist
        with pytest.raises(NotFound):
            await adm.job(ctx_g, "cmpl-doesnotexist")
        assert [j["id"] for j in await adm.jobs(ctx_a, 10)] == [ticket.job_id]
        assert await adm.jobs(ctx_g, 10) == []
        assert [u["job_id"] for u in await adm.usage(ctx_a, None, 10)] == [ticket.job_id]
        assert await adm.usage(ctx_g, None, 10) == []

    await run()
