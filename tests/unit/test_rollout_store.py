"""Rollout and drain rows on SQLite (the shared cases), the 0006 migration, and the model helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from haif.config import ModelConfig
from haif.exceptions import UnprocessableRequest
from haif.store import Database, migrate
from haif.store.db import create_db_engine
from haif.store.rollouts import Rollout
from tests.support.rollout_cases import CASES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_rollouts(case, sqlite_db: Database) -> None:  # noqa: ANN001
    case(sqlite_db)


def test_migration_0006_adds_the_rollouts_and_worker_drains_tables(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine, "0005")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old', '2024-01-01 00:00:00')"))
    migrate.upgrade(engine, "0006")
    with engine.begin() as conn:  # the server defaults: weight 0, no auto rollbacks, generation 1
        conn.execute(
            text(
                "INSERT INTO rollouts (model, base_version, stable_version, updated_at) "
                "VALUES ('m', '1', '1', '2024-01-01 00:00:00')"
            )
        )
        assert conn.execute(
            text("SELECT canary_weight, auto_rollbacks, generation, canary_version FROM rollouts")
        ).one() == (0, 0, 1, None)
        conn.execute(
            text("INSERT INTO worker_drains (worker_id, requested_at) VALUES ('w', '2024-01-01 00:00:00')")
        )
    with pytest.raises(Exception, match="CHECK"), engine.begin() as conn:
        conn.execute(text("UPDATE rollouts SET canary_weight = 101"))
    migrate.downgrade(engine, "0005")
    tables = set(inspect(engine).get_table_names())
    assert not tables & {"rollouts", "worker_drains"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM tenants")).scalar() == "old"
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    engine.dispose()


def _rollout(canary: str | None, weight: int) -> Rollout:
    return Rollout(
        model="m", base_version="1", stable_version="1", canary_version=canary, canary_weight=weight,
        canary_status=None, reason=None, auto_rollbacks=0, generation=1, updated_at=datetime.now(UTC),
    )


def test_weights_are_the_asked_shares() -> None:
    assert _rollout(None, 0).weights() == {"1": 100}
    assert _rollout("2", 0).weights() == {"1": 100, "2": 0}
    assert _rollout("2", 25).weights() == {"1": 75, "2": 25}


def test_each_version_is_served_by_its_artifact() -> None:
    llama = ModelConfig(name="tiny-llama", runtime="torch", artifact="tiny-llama:1")
    assert llama.at_version("1").artifact == "tiny-llama:1"
    assert llama.at_version("2").artifact == "tiny-llama:2"
    renamed = ModelConfig(name="chat", runtime="vllm", artifact="llama-8b:2024-07", version="2024-07")
    assert renamed.at_version("2024-09").artifact == "llama-8b:2024-09"
    assert ModelConfig(name="echo", runtime="echo").at_version("2").artifact is None
    with pytest.raises(UnprocessableRequest, match="from a path"):
        ModelConfig(name="dev", runtime="torch", path="/models/dev").at_version("2")
    with pytest.raises(UnprocessableRequest, match="artifact digest"):
        ModelConfig(name="pinned", runtime="torch", artifact="sha256:" + "a" * 64).at_version("2")
