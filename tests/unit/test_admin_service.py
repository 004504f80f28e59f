"""The admin operations on SQLite: roles, audit rows, keyset pages, the auth epoch, and the
credential caches that follow it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import text

from haif.admin.audit import Actor
from haif.admin.service import AdminService
from haif.exceptions import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from haif.gateway.auth import CredentialCaches, DatabaseAuthenticator
from haif.store import Database, migrate
from haif.store.db import create_db_engine
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.unit

ADMIN = Actor(name="token:1", role="admin", tenant="ops", request_id="req-1", client="127.0.0.1")


@pytest.fixture
def admin(sqlite_db: Database, tmp_path: Path) -> AdminService:
    return AdminService(sqlite_db, sqlite_config(tmp_path), ADMIN)


def as_tenant_admin(admin: AdminService, tenant: str) -> AdminService:
    return AdminService(admin._db, admin._config, Actor(name="token:9", role="tenant_admin", tenant=tenant))


def test_migration_0007_keeps_tenants_and_adds_the_operator_tables(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine, "0006")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old', '2024-01-01 00:00:00')"))
    migrate.upgrade(engine, "0007")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT priority, suspended_at FROM tenants")).one() == ("normal", None)
        assert conn.execute(text("SELECT count(*) FROM audit_log")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM auth_changes")).scalar_one() == 0
        conn.execute(text("SELECT caller FROM jobs")).all()
    migrate.downgrade(engine, "0006")


def test_every_change_leaves_one_audit_row_without_secrets(admin: AdminService) -> None:
    admin.create_tenant("acme", {"requests_per_minute": 5}, "high")
    created = admin.create_token("acme", ["inference"], ["echo"], 60, "ci")
    admin.update_tenant("acme", {"tokens_per_day": 1000})
    admin.update_tenant("acme", {"suspended": True})
    admin.update_tenant("acme", {"suspended": False})
    admin.revoke_token(str(created["id"]))
    rows = admin.list_audit(limit=10)["data"]
    assert [r["action"] for r in rows] == [
        "token.revoke", "tenant.resume", "tenant.suspend", "tenant.update", "token.create", "tenant.create",
    ]
    assert all(r["actor"] == "token:1" and r["request_id"] == "req-1" and r["client"] == "127.0.0.1" for r in rows)
    assert created["token"] not in json.dumps(rows)  # the secret is in the answer alone
    update = rows[3]
    assert update["before"]["tokens_per_day"] is None and update["after"]["tokens_per_day"] == 1000
    assert rows[0]["before"]["state"] == "active" and rows[0]["after"]["state"] == "revoked"


def test_revocation_and_suspension_move_the_auth_epoch(admin: AdminService) -> None:
    admin.create_tenant("acme", {})
    token = admin.create_token("acme")
    assert admin.auth_epoch is None  # creating grants nothing that was refused: no notice
    admin.revoke_token(token["prefix"])
    first = admin.auth_epoch
    admin.update_tenant("acme", {"suspended": True})
    assert first is not None and admin.auth_epoch > first
    again = AdminService(admin._db, admin._config, ADMIN)
    again.update_tenant("acme", {"suspended": True})  # no change: no new epoch
    assert again.auth_epoch is None
    again.update_tenant("acme", {"max_concurrent": 2})  # cached principals carry the limits
    assert again.auth_epoch > admin.auth_epoch


def test_pages_follow_the_keyset_and_refuse_a_forged_cursor(admin: AdminService) -> None:
    admin.create_tenant("acme", {})
    ids = [admin.create_token("acme")["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = admin.list_tokens(cursor=cursor, limit=2)
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert [t["id"] for t in admin.list_tokens(state="active", limit=10)["data"]] == ids
    for bad in ("not-a-cursor", "WyJ4Il0=", "W10=", "x" * 600):
        with pytest.raises(InvalidRequest, match="cursor"):
            admin.list_tokens(cursor=bad)
    with pytest.raises(InvalidRequest, match="limit"):
        admin.list_tokens(limit=1001)


def test_a_tenant_admin_sees_and_changes_its_own_tenant_only(admin: AdminService) -> None:
    admin.create_tenant("acme", {})
    admin.create_tenant("other", {})
    theirs = admin.create_token("other")
    mine = as_tenant_admin(admin, "acme")
    created = mine.create_token("acme", ["inference"])
    assert [t["tenant"] for t in mine.list_tokens()["data"]] == ["acme"]
    assert mine.list_jobs()["data"] == [] and mine.list_usage()["data"] == []
    for call in (
        lambda: mine.list_tokens(tenant="other"),
        lambda: mine.create_token("other"),
        lambda: mine.create_token("acme", ["admin"]),
        lambda: mine.list_usage(tenant="other"),
        lambda: mine.list_jobs(tenant="other"),
        lambda: mine.list_tenants(),
        lambda: mine.get_tenant("acme"),  # its tokens, jobs and usage: nothing else
        lambda: mine.update_tenant("acme", {"suspended": False}),
        lambda: mine.list_audit(),
        lambda: mine.list_rollouts(),
        lambda: mine.list_peers(),
    ):
        with pytest.raises(PermissionDenied):
            call()
    with pytest.raises(NotFound):  # another tenant's token is as if it did not exist
        mine.revoke_token(str(theirs["id"]))
    assert mine.revoke_token(str(created["id"]))["state"] == "revoked"


async def test_a_suspended_tenant_is_refused_and_the_epoch_drops_cached_answers(
    admin: AdminService, sqlite_db: Database
) -> None:
    await asyncio.to_thread(admin.create_tenant, "acme", {})
    token = (await asyncio.to_thread(admin.create_token, "acme"))["token"]
    auth = DatabaseAuthenticator(sqlite_db, ttl_s=3600, max_entries=100)
    caches = CredentialCaches(auth)
    caches.observe(0)
    assert (await auth.authenticate(token)).tenant == "acme"
    await asyncio.to_thread(admin.update_tenant, "acme", {"suspended": True})
    assert (await auth.authenticate(token)).tenant == "acme"  # cached for an hour ...
    caches.observe(admin.auth_epoch)  # ... until the routing table brings the new epoch
    with pytest.raises(PermissionDenied, match="suspended"):
        await auth.authenticate(token)
    await asyncio.to_thread(admin.update_tenant, "acme", {"suspended": False})
    caches.observe(admin.auth_epoch)
    assert (await auth.authenticate(token)).tenant == "acme"
    await asyncio.to_thread(admin.revoke_token, token)
    caches.observe(admin.auth_epoch)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(token)


async def test_jwt_tenants_come_from_the_store_created_only_where_allowed(sqlite_db: Database) -> None:
    from haif.gateway.identity import CallerAuthenticator, TenantDirectory

    directory = TenantDirectory(sqlite_db, ttl_s=3600, max_entries=100)
    assert await directory("newco", False) is None
    made = await directory("newco", True)  # an issuer with create_tenants
    assert made is not None and not made.suspended and made.limits.as_dict()["max_concurrent"] is None
    assert await directory("not a name!", True) is None  # refused, not raised
    service = AdminService(sqlite_db, sqlite_config(Path("/nonexistent")), ADMIN)
    await asyncio.to_thread(service.update_tenant, "newco", {"suspended": True})
    assert not (await directory("newco", False)).suspended  # cached ...
    directory.forget()  # ... until the auth epoch moves
    assert (await directory("newco", False)).suspended

    class Jwts:
        async def authenticate(self, token: str) -> str:
            return "jwt"

    class Keys:
        async def authenticate(self, token: str | None) -> str:
            return "key"

    caller = CallerAuthenticator(Keys(), Jwts())  # type: ignore[arg-type]
    assert await caller.authenticate("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln") == "jwt"
    assert await caller.authenticate("haif_abc_def") == "key"
    assert await CallerAuthenticator(Keys(), None).authenticate("eyJhbGciOiJSUzI1NiJ9.e30.c2ln") == "key"  # type: ignore[arg-type]


def test_the_admin_api_revokes_by_id_or_prefix_never_by_the_secret(admin: AdminService) -> None:
    admin.create_tenant("acme", {})
    made = admin.create_token("acme")
    with pytest.raises(NotFound):  # DELETE /admin/v1/tokens/{the token}: a secret in a URL
        admin.revoke_token(made["token"], secret_ok=False)
    assert admin.revoke_token(made["prefix"], secret_ok=False)["state"] == "revoked"
    other = admin.create_token("acme")
    assert admin.revoke_token(other["token"])["state"] == "revoked"  # the CLI on the database
