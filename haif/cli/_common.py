"""What every `haif` sub-command shares: the --config option, where the operator commands get
their admin operations (a deployment's admin API, or the database), errors into exit codes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from haif.exceptions import ConfigError, HaifError, RequestError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    from sqlalchemy.orm import Session

    from haif.admin.operations import Operations, Page, Record
    from haif.config import HaifConfig

ConfigOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional here
    typer.Option("--config", help="Config file (default: $HAIF_CONFIG or configs/local.yaml)."),
]

UrlOption = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional here
    typer.Option("--url", envvar="HAIF_URL", show_envvar=True,
                 help="HAIF's URL: run over its admin API instead of on the database."),
]
TokenOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--token", envvar="HAIF_TOKEN", show_envvar=True,
                 help="An API key with the admin scope, for --url."),
]
ProfileOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--profile", envvar="HAIF_PROFILE", show_envvar=True,
                 help="A [section] of profiles.toml giving url and token (default: [default])."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
DEFAULT_PROFILE = "default"
PROFILES_FILE = Path("haif") / "profiles.toml"

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


# --- where the operator commands get their operations ------------------------------------------


@dataclass(frozen=True)
class Remote:
    """A deployment's admin API: where, and with which token."""

    url: str
    token: str


def profiles_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/haif/profiles.toml``, else ``~/.config/haif/profiles.toml``."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / PROFILES_FILE


def read_profile(name: str, path: Path, required: bool) -> dict[str, str] | None:
    """The ``[name]`` section of the profiles file (None when absent and not ``required``).

    Raises:
        ConfigError: the file is unreadable or not TOML; ``required`` and no such section.
    """
    import tomllib

    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"no profile {name!r}: {path} does not exist") from None
        return None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read profiles {path}: {exc}") from exc
    section = profiles.get(name)
    if section is None:
        if required:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"no profile {name!r} in {path} (profiles: {known})")
        return None
    if not isinstance(section, dict) or any(
        not isinstance(section.get(k, ""), str) for k in ("url", "token")
    ):
        raise ConfigError(f"profile {name!r} in {path}: give url and token as strings")
    return {k: section[k] for k in ("url", "token") if section.get(k)}


def resolve_remote(
    url: str | None, token: str | None, profile: str | None, environ: Mapping[str, str] | None = None
) -> Remote | None:
    """The admin API to use, or None: the database of the config.

    ``--url`` / ``--token`` (or HAIF_URL / HAIF_TOKEN) win over the profile's; a profile is the
    one named (``--profile`` or HAIF_PROFILE), else ``[default]`` when nothing else is given.

    Raises:
        ConfigError: a URL without a token (or the reverse), or a profile that is not there.
    """
    url, token = url or None, token or None
    name = profile or (DEFAULT_PROFILE if url is None and token is None else None)
    if name is not None:
        path = profiles_path(environ)
        section = read_profile(name, path, required=profile is not None) or {}
        url, token = url or section.get("url"), token or section.get("token")
    if url and not token:
        raise ConfigError(
            f"a URL ({url}) but no token: pass --token or set HAIF_TOKEN (an API key with the "
            "admin scope)"
        )
    if token and not url:
        raise ConfigError("a token but no URL: pass --url or set HAIF_URL")
    return Remote(url, token) if url and token else None


def remote_or_exit(url: str | None, token: str | None, profile: str | None) -> Remote | None:
    """:func:`resolve_remote`, its errors as exit codes (for commands that differ by mode)."""
    with errors_to_exit():
        return resolve_remote(url, token, profile)


@contextmanager
def operations(
    config: Path | None, url: str | None, token: str | None, profile: str | None
) -> Iterator[Operations]:
    """The admin operations: over HAIF's admin API when a URL and token are given (flags,
    environment or a profile), else on the config's database (audited as ``cli:<os user>``).
    HAIF errors inside the block become `error: ...` and exit codes."""
    remote = remote_or_exit(url, token, profile)
    if remote is not None:
        from haif.admin.client import HttpOperations

        with errors_to_exit(), HttpOperations(remote.url, remote.token) as ops:
            yield ops
        return
    from haif.admin.service import direct_operations

    cfg = load(config)
    with errors_to_exit(), direct_operations(cfg) as ops:
        yield ops


def remote_url(ops: Operations) -> str | None:
    """The deployment's URL when ``ops`` reach it over HTTP; None on the database."""
    from haif.admin.client import HttpOperations

    return ops.url if isinstance(ops, HttpOperations) else None


def needs_remote(what: str) -> None:
    """Refuse a command that only a running deployment can answer (exit 2)."""
    typer.echo(
        f"error: {what} needs a running deployment: set HAIF_URL and HAIF_TOKEN (or pass --url "
        "and --token, or use a profile)",
        err=True,
    )
    raise typer.Exit(EXIT_USAGE)


# --- printing what the operations answer ---------------------------------------------------------

LimitOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--limit", min=1, help="Most rows shown (default: all)."),
]


def collect(fetch: Callable[[str | None, int], Page], limit: int | None) -> list[Record]:
    """The records of a list, following its cursors, up to ``limit`` (None: all of them).
    ``fetch(cursor, page_size)`` answers one page."""
    from itertools import islice

    from haif.admin.client import iter_pages
    from haif.admin.operations import MAX_PAGE

    size = MAX_PAGE if limit is None else min(limit, MAX_PAGE)
    return list(islice(iter_pages(lambda cursor: fetch(cursor, size)), limit))


def echo_json_lines(records: Iterable[Record]) -> None:
    import json

    for record in records:
        typer.echo(json.dumps(record))


def print_table(columns: tuple[str, ...], rows: Iterable[Iterable[object]], width: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(width=width).print(table)
