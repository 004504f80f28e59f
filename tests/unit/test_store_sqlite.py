"""The metadata store on SQLite (the embedded default): the shared cases and the migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from haif.store import Database, migrate
from haif.store.db import create_db_engine
from haif.store.models import Base
from tests.support.store_cases import CASES, WRITES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("writes", WRITES, ids=lambda w: w.mode)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_store(case, writes, sqlite_db: Database) -> None:  # noqa: ANN001
    case(sqlite_db, writes)


def test_migrations_upgrade_downgrade_and_match_the_models(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (name, created_at) VALUES ('old', '2024-01-01 00:00:00')")
        )
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM tenants")).scalar() == "old"
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []
    migrate.downgrade(engine, "0001")
    assert "jobs" not in inspect(engine).get_table_names()
    migrate.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_migration_0003_adds_attempts_and_the_dead_letters_table(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine, "0002")  # the previous revision, with a job in it
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (name, created_at) VALUES ('old', '2024-01-01 00:00:00')")
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, kind, model, version, state, created_at) "
                "SELECT 'cmpl-old', id, 'completion', 'echo', '1', 'failed', "
                "'2024-01-01 00:00:00' FROM tenants"
            )
        )
    migrate.upgrade(engine, "0003")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT attempts FROM jobs")).scalar() == 1
    assert "dead_letters" in inspect(engine).get_table_names()
    migrate.downgrade(engine, "0002")
    assert "dead_letters" not in inspect(engine).get_table_names()
    assert "attempts" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.connect() as conn:  # the job survived, and so did its state check
        assert conn.execute(text("SELECT id FROM jobs")).scalar() == "cmpl-old"
    with pytest.raises(Exception, match="CHECK"), engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET state = 'bogus'"))
    engine.dispose()


def test_migration_0004_adds_the_p2p_peers_table(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (name, created_at) VALUES ('old', '2024-01-01 00:00:00')")
        )
    migrate.upgrade(engine, "0004")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO p2p_peers (public_key, tenant_id, created_at) "
                "SELECT :key, id, '2024-01-01 00:00:00' FROM tenants"
            ),
            {"key": "ab" * 32},
        )
    with pytest.raises(Exception, match="UNIQUE"), engine.begin() as conn:
        conn.execute(
            text("INSERT INTO p2p_peers (public_key, tenant_id, created_at) VALUES (:key, 1, '2024-01-01')"),
            {"key": "ab" * 32},
        )
    migrate.downgrade(engine, "0003")
    assert "p2p_peers" not in inspect(engine).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM tenants")).scalar() == "old"
    engine.dispose()


def test_migration_0005_adds_the_jobs_end_user(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(engine, "0004")  # the previous revision, with a job in it
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (name, created_at) VALUES ('old', '2024-01-01 00:00:00')")
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, kind, model, version, state, created_at) "
                "SELECT 'cmpl-old', id, 'completion', 'echo', '1', 'succeeded', "
                "'2024-01-01 00:00:00' FROM tenants"
            )
        )
    migrate.upgrade(engine, "0005")
    with engine.connect() as conn:  # the old job has no end user
        assert conn.execute(text("SELECT end_user FROM jobs")).one() == (None,)
    migrate.downgrade(engine, "0004")
    assert "end_user" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM jobs")).scalar() == "cmpl-old"
    engine.dispose()
