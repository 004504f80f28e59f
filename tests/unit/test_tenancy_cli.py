"""`haif tenants|tokens|quotas|usage|db` on the embedded SQLite store, and bootstrap's dev tenant."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from haif.bootstrap import prepare
from haif.cli.main import app
from haif.cli.tenancy import parse_since
from haif.store import open_database
from haif.store.models import ApiToken, Tenant
from haif.store.tokens import hash_token
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.unit


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "haif.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"state_dir": str(tmp_path / "state")},
                "database": {"url": f"sqlite:///{tmp_path / 'state' / 'haif.db'}"},
            }
        )
    )
    return path


def run(cfg: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def test_tenants_tokens_quotas(cfg: Path) -> None:
    assert "created tenant acme" in run(
        cfg, "tenants", "create", "acme", "--requests-per-minute", "50", "--max-concurrent", "4"
    )
    assert "already exists" in run(cfg, "tenants", "create", "acme", code=1)
    assert "tenant name" in run(cfg, "tenants", "create", "no spaces", code=2)
    run(cfg, "tenants", "create", "acme2", "--tokens-per-day", "lots", code=2)
    assert "between 0 and" in run(cfg, "tenants", "create", "acme3", "--requests-per-minute", str(10**12), code=2)
    run(cfg, "tenants", "create", "acme3", "--max-concurrent", "-1", code=2)
    listed = [json.loads(line) for line in run(cfg, "tenants", "list", "--json").splitlines()]
    assert listed == [
        {
            "id": 1,
            "name": "acme",
            "requests_per_minute": 50,
            "tokens_per_minute": None,
            "tokens_per_day": None,
            "max_concurrent": 4,
        }
    ]
    out = run(
        cfg,
        "tokens",
        "create",
        "--tenant",
        "acme",
        "--scopes",
        "inference",
        "--scopes",
        "admin",
        "--models",
        "echo,minilm",
        "--expires-in",
        "3600",
    )
    token = out.strip().splitlines()[-1]
    assert token.startswith("haif_") and len(token) > 50
    tokens = [json.loads(line) for line in run(cfg, "tokens", "list", "--json").splitlines()]
    assert (
        len(tokens) == 1
        and tokens[0]["scopes"] == "admin inference"
        and tokens[0]["models"] == ["echo", "minilm"]
    )
    assert tokens[0]["state"] == "active" and token not in json.dumps(tokens)  # ids, never secrets
    assert "no tenant" in run(cfg, "tokens", "create", "--tenant", "nobody", code=1)
    assert "unknown scope" in run(
        cfg, "tokens", "create", "--tenant", "acme", "--scopes", "root", code=2
    )
    run(cfg, "tokens", "create", "--tenant", "acme", "--expires-in", "1e20", code=2)
    run(cfg, "tokens", "create", "--tenant", "acme", "--name", "n" * 200, code=2)
    assert "revoked token 1" in run(cfg, "tokens", "revoke", token)
    assert (
        json.loads(run(cfg, "tokens", "list", "--json", "--tenant", "acme"))["state"] == "revoked"
    )
    assert "no such token" in run(cfg, "tokens", "revoke", "42", code=1)
    out = run(
        cfg,
        "quotas",
        "set",
        "--tenant",
        "acme",
        "--tokens-per-day",
        "1000",
        "--requests-per-minute",
        "unlimited",
    )
    assert "requests_per_minute=unlimited" in out and "tokens_per_day=1000" in out
    run(cfg, "quotas", "set", "--tenant", "acme", code=2)  # nothing to set


def test_usage_export_formats(cfg: Path) -> None:
    run(cfg, "tenants", "create", "acme")
    assert run(cfg, "usage", "export") == ""
    assert run(cfg, "usage", "export", "--format", "csv").strip() == (
        "tenant,model,version,job_id,prompt_tokens,completion_tokens,started_at,finished_at,caller"
    )
    run(cfg, "usage", "export", "--format", "xml", code=2)
    run(cfg, "usage", "export", "--since", "last tuesday", code=2)


def test_parse_since() -> None:
    now = datetime(2030, 1, 2, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_since("2030-01-01", now) == datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_since("2030-01-01T01:00:00+01:00", now) == datetime(2030, 1, 1, tzinfo=UTC)


def test_db_commands(cfg: Path) -> None:
    assert "current: base" in run(cfg, "db", "current")
    assert "revision 0007" in run(cfg, "db", "upgrade")
    assert "revision 0001" in run(cfg, "db", "downgrade", "0001")
    assert "revision 0007" in run(cfg, "db", "upgrade")


def test_bootstrap_creates_default_tenant_and_a_dev_key_kept_across_restarts(
    tmp_path: Path,
) -> None:
    config = sqlite_config(tmp_path, auth={"dev_key": True})
    first = prepare(config)
    key = first.auth.dev_api_key
    assert key.startswith("haif_")
    key_file = tmp_path / "state" / "dev_api_key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    again = prepare(config)  # `make serve` once more: the same key, nothing duplicated
    assert again.auth.dev_api_key == key
    db = open_database(config)
    with db.session() as s:
        assert [t.name for t in s.scalars(select(Tenant))] == ["default"]
        (token,) = s.scalars(select(ApiToken)).all()
        assert token.secret_hash == hash_token(key) and token.scopes == "admin inference"
    db.close()


def test_bootstrap_registers_a_configured_dev_key(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path, auth={"dev_api_key": "my-own-development-key-0001"})
    prepare(config)
    db = open_database(config)
    with db.session() as s:
        (token,) = s.scalars(select(ApiToken)).all()
        assert token.secret_hash == hash_token("my-own-development-key-0001")
        assert token.prefix.startswith("k-")  # found by a prefix derived from its hash
    db.close()


def test_static_backend_needs_no_database(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path, auth={"backend": "static"})
    prepare(config)
    assert not (tmp_path / "haif.db").exists()
