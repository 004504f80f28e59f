"""What every `haif` sub-command shares: the --config option and turning errors into exit codes."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from haif.exceptions import ConfigError, HaifError, RequestError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session

    from haif.config import HaifConfig

ConfigOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional here
    typer.Option("--config", help="Config file (default: $HAIF_CONFIG or configs/local.yaml)."),
]

EXIT_FAILED = 1  # the operation failed (not found, conflict, store down)
EXIT_USAGE = 2  # the command or the config is wrong


def load(config: Path | None) -> HaifConfig:
    from haif.config import load_config

    try:
        return load_config(config)
    except HaifError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """HAIF errors become one `error: ...` line on stderr and an exit code, never a trace."""
    try:
        yield
    except HaifError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        usage = isinstance(exc, ConfigError) or (
            isinstance(exc, RequestError) and exc.status_code in (400, 422)
        )
        raise typer.Exit(EXIT_USAGE if usage else EXIT_FAILED) from None


@contextmanager
def db_session(config: Path | None) -> Iterator[Session]:
    """A session on the config's metadata store (migrated if ``database.auto_migrate``), committed
    when the block ends without an error; HAIF errors inside become exit codes."""
    from haif.store import open_database

    cfg = load(config)
    with errors_to_exit():
        db = open_database(cfg, pool_size=1)
        try:
            with db.session() as session:
                yield session
        finally:
            db.close()
