"""Rollout and drain rows on PostgreSQL: the shared cases, and the 0006 migration up and down."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from haif.store import Database, migrate
from haif.store.db import create_db_engine
from tests.support import services
from tests.support.rollout_cases import CASES


@pytest.fixture
def pg_db(pg_server: str) -> Database:
    with services.fresh_database(pg_server, "haif_rollout") as url:
        db = Database(create_db_engine(url, pool_size=2))
        migrate.upgrade(db.engine)
        yield db
        db.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_rollouts(case, pg_db: Database) -> None:  # noqa: ANN001
    case(pg_db)


def test_migration_0006_from_the_previous_revision_and_back(pg_server: str) -> None:
    with services.fresh_database(pg_server, "haif_mig6") as url:
        engine = create_db_engine(url)
        migrate.upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old', now())"))
        migrate.upgrade(engine, "0006")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO rollouts (model, base_version, stable_version, updated_at) "
                    "VALUES ('m', '1', '1', now())"
                )
            )
            assert conn.execute(
                text("SELECT canary_weight, auto_rollbacks, generation FROM rollouts")
            ).one() == (0, 0, 1)
        with pytest.raises(IntegrityError, match="ck_rollouts_canary_weight"), engine.begin() as conn:
            conn.execute(text("UPDATE rollouts SET canary_weight = 101"))
        migrate.downgrade(engine, "0005")
        assert not set(inspect(engine).get_table_names()) & {"rollouts", "worker_drains"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM tenants")).scalar() == "old"
        engine.dispose()
