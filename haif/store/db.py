"""Engines, connections and the thread pool that keeps blocking database I/O off event loops.

PostgreSQL goes through psycopg 3; SQLite through the standard library driver, with
every transaction opened ``BEGIN IMMEDIATE`` so that two writers serialize up front
instead of failing on a lock upgrade, in WAL mode so that readers never wait.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from haif.exceptions import ConfigError, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Connection, Engine

    from haif.config import HaifConfig

logger = logging.getLogger("haif.store")

P = ParamSpec("P")
T = TypeVar("T")

# Errors that mean "the store is not reachable now", not "the request is wrong".
_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def normalize_url(url: str) -> str:
    """Give PostgreSQL URLs the psycopg 3 driver (plain ``postgresql://`` means psycopg2)."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL in it
        raise ConfigError(
            f"database.url is not a valid SQLAlchemy URL: {type(exc).__name__}"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigError(f"database.url: unsupported database {parsed.get_backend_name()!r}")
    return parsed.render_as_string(hide_password=False)


def create_db_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    pool_timeout_s: float = 10.0,
    connect_timeout_s: float = 5.0,
    statement_timeout_ms: int = 10_000,
) -> Engine:
    url = normalize_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout_s,
            connect_args={"timeout": connect_timeout_s, "check_same_thread": False},
        )
        _sqlite_transactions(engine, busy_timeout_ms=int(connect_timeout_s * 1000))
        return engine
    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else ""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout_s,
        pool_recycle=1800,
        connect_args={"connect_timeout": max(1, round(connect_timeout_s)), "options": options},
    )


def _sqlite_transactions(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling would BEGIN DEFERRED lazily; take control.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """One engine per process, its sessions, and bounded threads to call it from async code."""

    def __init__(self, engine: Engine, threads: int | None = None) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        size = threads or (engine.pool.size() + getattr(engine.pool, "_max_overflow", 0))  # type: ignore[attr-defined]
        self._threads = max(1, size)
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, config: HaifConfig, *, pool_size: int | None = None) -> Database:
        db = config.database
        size = pool_size or db.pool_size
        engine = create_db_engine(
            config.database_url(),
            pool_size=size,
            max_overflow=db.max_overflow if pool_size is None else 0,
            pool_timeout_s=db.pool_timeout_s,
            connect_timeout_s=db.connect_timeout_s,
            statement_timeout_ms=db.statement_timeout_ms,
        )
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction: committed on success, rolled back on error."""
        with _translated(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def single_statement(self) -> Iterator[Connection]:
        """For work that is one statement: autocommit on PostgreSQL (no BEGIN/COMMIT round
        trips); on SQLite a transaction, since its writers serialize on one anyway."""
        if self.dialect != "postgresql":
            with self.begin() as conn:
                yield conn
            return
        with _translated(), self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads (its implicit transaction is rolled back on close)."""
        with _translated(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in a transaction (for the CLI and bootstrap, not the hot path)."""
        with _translated(), self.sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self.begin() as conn:
            conn.execute(text("SELECT 1"))

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking ``fn`` on the database threads, from an event loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="haif-db")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        # The driver's message may name hosts and users: log it, tell the client less.
        logger.warning("metadata store unavailable: %s", exc)
        raise StoreUnavailable("the metadata store is unavailable; retry later") from None
    except DBAPIError as exc:
        if exc.connection_invalidated:
            logger.warning("metadata store connection lost: %s", exc)
            raise StoreUnavailable("the metadata store connection was lost; retry later") from None
        raise
