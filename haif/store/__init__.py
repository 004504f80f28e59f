"""HAIF's metadata store: tenants, API tokens, quotas, jobs and usage (SQLAlchemy 2 + Alembic).

PostgreSQL (psycopg 3) in production, a SQLite file as the embedded default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from haif.store.db import Database

if TYPE_CHECKING:
    from haif.config import HaifConfig

__all__ = ["Database", "open_database"]


def open_database(
    config: HaifConfig, *, migrate: bool | None = None, pool_size: int | None = None
) -> Database:
    """The configured database, upgraded to the latest schema if ``database.auto_migrate``.

    ``migrate`` overrides the config's choice.
    """
    db = Database.from_config(config, pool_size=pool_size)
    if config.database_url().startswith("sqlite"):
        from pathlib import Path

        path = db.engine.url.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if config.database.auto_migrate if migrate is None else migrate:
        from haif.store import migrate as migrations

        if not migrations.is_current(db.engine):
            migrations.upgrade(db.engine)
    return db
