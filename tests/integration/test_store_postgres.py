"""The metadata store on PostgreSQL: the shared cases, migrations, and exactness across processes."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from haif.store import Database, migrate
from haif.store.db import create_db_engine
from haif.store.ledger import usage_total
from haif.store.models import Base, Job, Quota
from haif.store.quotas import QuotaLimits
from tests.support import services
from tests.support.deployment import haif_cli
from tests.support.store_cases import CASES, PG_WRITES, hammer, hammer_async, tenant


@pytest.fixture
def pg_db(pg_server: str) -> Database:
    with services.fresh_database(pg_server, "haif_case") as url:
        db = Database(create_db_engine(url, pool_size=4))
        migrate.upgrade(db.engine)
        yield db
        db.close()


@pytest.mark.parametrize("writes", PG_WRITES, ids=lambda w: w.mode)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_store(case, writes, pg_db: Database) -> None:  # noqa: ANN001
    case(pg_db, writes)


def test_migrations_on_an_empty_database_and_from_the_previous_revision(pg_server: str) -> None:
    with services.fresh_database(pg_server, "haif_mig") as url:
        engine = create_db_engine(url)
        migrate.upgrade(engine, "0001")  # the previous revision, with data in it
        assert migrate.current(engine) == "0001"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old', now())"))
            conn.execute(
                text(
                    "INSERT INTO quotas (tenant_id, requests_per_minute, updated_at) "
                    "SELECT id, 7, now() FROM tenants"
                )
            )
        migrate.upgrade(engine)
        assert migrate.current(engine) == migrate.head() == "0007"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT requests_per_minute FROM quotas")).scalar() == 7
            diff = compare_metadata(
                MigrationContext.configure(
                    conn, opts={"compare_type": True, "compare_server_default": True}
                ),
                Base.metadata,
            )
        assert diff == [], diff  # the migrations build exactly the models
        migrate.downgrade(engine, "0001")
        assert "jobs" not in inspect(engine).get_table_names()
        migrate.downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(engine)  # and back up from nothing
        assert migrate.current(engine) == "0007"
        engine.dispose()


def test_migration_0003_from_the_previous_revision_and_back(pg_server: str) -> None:
    with services.fresh_database(pg_server, "haif_mig3") as url:
        engine = create_db_engine(url)
        migrate.upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old', now())"))
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, kind, model, version, state, created_at) "
                    "SELECT 'cmpl-old', id, 'completion', 'echo', '1', 'failed', now() FROM tenants"
                )
            )
        migrate.upgrade(engine, "0003")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT attempts FROM jobs")).scalar() == 1
        assert "dead_letters" in inspect(engine).get_table_names()
        migrate.downgrade(engine, "0002")
        assert "dead_letters" not in inspect(engine).get_table_names()
        assert "attempts" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM jobs")).scalar() == "cmpl-old"
        engine.dispose()


def test_db_cli_upgrade_downgrade_current(pg_server: str) -> None:
    with services.fresh_database(pg_server, "haif_cli") as url:
        env = {"HAIF_DATABASE__URL": url}
        assert "current: base" in haif_cli(env, "db", "current")
        assert "revision 0001" in haif_cli(env, "db", "upgrade", "0001")
        assert "revision 0007" in haif_cli(env, "db", "upgrade")
        assert "revision base" in haif_cli(env, "db", "downgrade", "base")


def _in_processes(
    url: str,
    tenant_id: int,
    limits: QuotaLimits,
    n_per_process: int,
    fn=hammer,
    **kw: object,  # noqa: ANN001
) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        parts = [pool.submit(fn, url, tenant_id, n_per_process, limits, **kw) for _ in range(2)]
        return [word for p in parts for word in p.result()]


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [(QuotaLimits(requests_per_minute=50), 50), (QuotaLimits(tokens_per_minute=500), 50)],
    ids=["requests_per_minute", "tokens_per_minute"],
)
def test_async_writes_exact_across_two_processes(
    pg_url: str, limits: QuotaLimits, allowed: int
) -> None:
    """As the Gateway writes on PostgreSQL: coroutines on an event loop, two processes."""
    db = Database(create_db_engine(pg_url))
    migrate.upgrade(db.engine)
    t = tenant(db, limits)
    words = _in_processes(pg_url, t, limits, 100, fn=hammer_async, settle_with=10)
    assert words.count("reserved") == allowed and words.count("refused") == 200 - allowed
    with db.connect() as conn:
        assert usage_total(conn, t) == (allowed, allowed * 5, allowed * 5)
        q = conn.execute(select(Quota).where(Quota.tenant_id == t)).one()
    assert q.in_flight == 0
    if limits.tokens_per_minute:
        assert q.minute_tokens == 500  # every reservation used all it took: no refund, no leak
    db.close()


def test_requests_per_minute_exact_across_two_processes(pg_url: str) -> None:
    """200 concurrent reservations from two 'Gateways', 50 allowed: exactly 50 pass."""
    db = Database(create_db_engine(pg_url))
    migrate.upgrade(db.engine)
    limits = QuotaLimits(requests_per_minute=50)
    t = tenant(db, limits)
    words = _in_processes(pg_url, t, limits, 100, settle_with=7)
    assert words.count("reserved") == 50 and words.count("refused") == 150
    with db.connect() as conn:
        assert usage_total(conn, t) == (50, 50 * 3, 50 * 4)
        assert (
            conn.execute(select(Quota.minute_requests).where(Quota.tenant_id == t)).scalar() == 50
        )
    db.close()


def test_tokens_per_minute_exact_across_two_processes(pg_url: str) -> None:
    db = Database(create_db_engine(pg_url))
    migrate.upgrade(db.engine)
    limits = QuotaLimits(tokens_per_minute=300)
    t = tenant(db, limits)
    words = _in_processes(pg_url, t, limits, 60, settle_with=10)  # each uses the 10 tokens it took
    assert words.count("reserved") == 30  # 300 tokens / 10: exact, refunds are zero
    with db.connect() as conn:
        q = conn.execute(select(Quota).where(Quota.tenant_id == t)).one()
        assert (q.minute_tokens, q.in_flight) == (300, 0)
        assert usage_total(conn, t) == (30, 150, 150)
    db.close()


def test_concurrency_slots_exact_across_two_processes(pg_url: str) -> None:
    """120 requests that hold their slot (not settled), 8 slots: exactly 8 get one."""
    db = Database(create_db_engine(pg_url))
    migrate.upgrade(db.engine)
    limits = QuotaLimits(max_concurrent=8)
    t = tenant(db, limits)
    words = _in_processes(pg_url, t, limits, 60)
    assert words.count("reserved") == 8 and words.count("refused") == 112
    with db.connect() as conn:
        assert conn.execute(select(Quota.in_flight).where(Quota.tenant_id == t)).scalar() == 8
    db.close()


def test_one_idempotency_key_one_job_across_two_processes(pg_url: str) -> None:
    db = Database(create_db_engine(pg_url))
    migrate.upgrade(db.engine)
    t = tenant(db)
    words = _in_processes(pg_url, t, QuotaLimits(), 25, key="same-key")
    assert words.count("reserved") == 1 and words.count("existing") == 49
    with db.connect() as conn:
        jobs = conn.execute(select(Job.id).where(Job.tenant_id == t)).all()
    assert len(jobs) == 1
    db.close()
