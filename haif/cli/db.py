"""`haif db`: the metadata store's schema (Alembic migrations shipped in the package)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from haif.cli._common import ConfigOption, errors_to_exit, load

db_app = typer.Typer(help="Metadata store schema migrations.", no_args_is_help=True)


def _engine(config: Path | None):  # noqa: ANN202
    from haif.store.db import create_db_engine

    cfg = load(config)
    url = cfg.database_url()
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    return create_db_engine(url, pool_size=1, max_overflow=0)


@db_app.command("upgrade")
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    config: ConfigOption = None,
) -> None:
    """Upgrade the schema (to the latest revision by default)."""
    from haif.store import migrate

    with errors_to_exit():
        engine = _engine(config)
        migrate.upgrade(engine, revision)
        typer.echo(f"database at revision {migrate.current(engine)}")


@db_app.command("downgrade")
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision ('base' drops every table).")],
    config: ConfigOption = None,
) -> None:
    """Downgrade the schema to REVISION."""
    from haif.store import migrate

    with errors_to_exit():
        engine = _engine(config)
        migrate.downgrade(engine, revision)
        typer.echo(f"database at revision {migrate.current(engine) or 'base'}")


@db_app.command("current")
def current(config: ConfigOption = None) -> None:
    """Print the schema revision of the database and the latest one."""
    from haif.store import migrate

    with errors_to_exit():
        engine = _engine(config)
        typer.echo(f"current: {migrate.current(engine) or 'base'}")
        typer.echo(f"head: {migrate.head()}")
