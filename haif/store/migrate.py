"""Schema migrations (Alembic), run by ``haif db ...``, by bootstrap and by the tests.

The migration scripts ship inside the package (``haif/store/migrations``), so an
installed ``haif`` can upgrade a database without the source tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Serializes concurrent upgrades (two `haif serve` on one PostgreSQL) on a session lock.
_PG_LOCK_KEY = 0x48414946  # "HAIF"


def _config(conn: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _locked(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as conn:
        _locked(conn)
        command.upgrade(_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        _locked(conn)
        command.downgrade(_config(conn), revision)


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    from alembic.script import ScriptDirectory

    cfg = _config(None)  # type: ignore[arg-type]
    return ScriptDirectory.from_config(cfg).get_current_head() or ""


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, first docstring line), oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config(None))  # type: ignore[arg-type]
    revs = list(script.walk_revisions())
    return [(r.revision, r.down_revision, (r.doc or "").splitlines()[0]) for r in reversed(revs)]  # type: ignore[misc]


def is_current(engine: Engine) -> bool:
    return current(engine) == head()
