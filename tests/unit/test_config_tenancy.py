"""The tenancy sections of the config: database, redis, quotas, jobs, usage, auth."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from haif.config import HaifConfig, load_config
from haif.exceptions import ConfigError
from haif.store.db import normalize_url

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]


def test_embedded_default_is_sqlite_under_the_start_directory(tmp_path: Path) -> None:
    config = HaifConfig(base_dir=str(tmp_path))
    assert config.database_url() == f"sqlite:///{tmp_path}/.haif/haif.db"
    assert config.auth.backend == "database" and not config.rate_limits_on_redis()
    assert (
        HaifConfig(database={"url": "sqlite:////abs/h.db"}).database_url() == "sqlite:////abs/h.db"
    )
    pg = "postgresql+psycopg://u@h:5432/db"
    assert HaifConfig(database={"url": pg}).database_url() == pg


def test_rate_limit_backend() -> None:
    assert HaifConfig(redis={"url": "redis://x:6379/0"}).rate_limits_on_redis()
    cfg = HaifConfig(redis={"url": "redis://x:6379/0"}, quotas={"rate_limit_backend": "database"})
    assert not cfg.rate_limits_on_redis()
    with pytest.raises(ValueError, match="redis.url is unset"):
        HaifConfig(quotas={"rate_limit_backend": "redis"})


def test_env_overrides_point_at_another_store(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": "sqlite:///x.db"}}))
    config = load_config(
        path,
        environ={
            "HAIF_DATABASE__URL": "postgresql+psycopg://postgres@127.0.0.1:5432/t",
            "HAIF_REDIS__URL": "redis://127.0.0.1:6379/0",
            "HAIF_USAGE__WEBHOOK_URL": "http://127.0.0.1:9/u",
            "HAIF_AUTH__TOKEN_CACHE_TTL_S": "1",
        },
    )
    assert config.database.url.startswith("postgresql") and config.redis.url
    assert config.usage.webhook_url == "http://127.0.0.1:9/u" and config.auth.token_cache_ttl_s == 1


@pytest.mark.parametrize(
    "data",
    [
        {"auth": {"backend": "ldap"}},
        {"auth": {"token_cache_ttl_s": -1}},
        {"usage": {"webhook_url": "ftp://billing"}},
        {"jobs": {"max_idempotency_key_chars": 1000}},
        {"redis": {"key_prefix": "has space"}},
        {"database": {"url": ""}},
        {"quotas": {"rate_limit_backend": "memcached"}},
    ],
)
def test_bad_values_are_rejected(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError):
        load_config(path, environ={})


def test_database_urls_are_normalized() -> None:
    assert normalize_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    with pytest.raises(ConfigError, match="unsupported"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ConfigError, match="not a valid"):
        normalize_url("::not a url::")


def test_shipped_configs_use_the_store_as_documented() -> None:
    local = load_config(ROOT / "configs" / "local.yaml", environ={})
    assert local.database.url.startswith("sqlite") and local.redis.url is None
    production = load_config(ROOT / "configs" / "production.example.yaml", environ={})
    assert (
        production.database.url.startswith("postgresql+psycopg")
        and production.rate_limits_on_redis()
    )
    integration = load_config(ROOT / "tests" / "configs" / "integration.yaml", environ={})
    assert integration.server.gateway_replicas == 2 and integration.redis.url
