"""PostgreSQL and Redis for the tests: the one named by the environment, else the local one, else our own.

``HAIF_TEST_DATABASE_URL`` / ``HAIF_TEST_REDIS_URL`` win; otherwise a server already
listening on the default local port is used; otherwise one is started in a temporary
directory and stopped at the end. Tests never skip for want of a server. Each test
session works in its own database (and its own Redis key prefix), created here and
dropped at the end, so that sessions running side by side never see each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.net import free_port
from tests.support.waiting import wait_for

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT_S = 120  # a loaded 2-core machine starts PostgreSQL slowly


# --- PostgreSQL ------------------------------------------------------------------------------


def _pg_answers(url: str) -> bool:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        with psycopg.connect(
            host=u.host,
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            dbname=u.database or "postgres",
            connect_timeout=2,
        ):
            return True
    except psycopg.Error:
        return False


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(
        f"no PostgreSQL server to use and no {name} to start one (set HAIF_TEST_DATABASE_URL)"
    )


@contextmanager
def _own_postgres() -> Iterator[str]:
    """A throw-away PostgreSQL on a free port (run as user postgres when we are root)."""
    root = Path(tempfile.mkdtemp(prefix="haif-pg-"))
    data, port = root / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            _pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "start",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        wait_for(lambda: _pg_answers(url), START_TIMEOUT_S, 0.1, "PostgreSQL to start")
        yield url
    finally:
        subprocess.run(
            [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL the tests may create databases on."""
    url = os.environ.get("HAIF_TEST_DATABASE_URL")
    if url:
        yield url.replace("postgresql://", "postgresql+psycopg://", 1)
        return
    if _pg_answers(DEFAULT_PG_URL):
        yield DEFAULT_PG_URL
        return
    with _own_postgres() as own:
        yield own


def _admin(url: str):  # noqa: ANN202
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host,
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=u.database or "postgres",
        autocommit=True,
        connect_timeout=5,
    )


@contextmanager
def fresh_database(server_url: str, label: str = "haif_test") -> Iterator[str]:
    """A new, empty database on ``server_url`` for the duration; dropped afterwards."""
    from sqlalchemy.engine import make_url

    name = f"{label}_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- Redis -----------------------------------------------------------------------------------


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@contextmanager
def redis_server() -> Iterator[str]:
    url = os.environ.get("HAIF_TEST_REDIS_URL")
    if url:
        yield url
        return
    if _redis_answers(DEFAULT_REDIS_URL):
        yield DEFAULT_REDIS_URL
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "no Redis to use and no redis-server to start one (set HAIF_TEST_REDIS_URL)"
        )
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _redis_answers(url), START_TIMEOUT_S, 0.1, "Redis to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


class OwnRedis:
    """A private redis-server the test may kill and restart (never the machine's shared one).

    Append-only with fsync on every write, as a DLQ's Redis should run: entries survive a
    kill -9 and a restart.
    """

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server to start a private Redis")
        self._binary = binary
        self._dir = Path(tempfile.mkdtemp(prefix="haif-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self._dir),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _redis_answers(self.url), START_TIMEOUT_S, 0.1, "Redis to start")

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


class OwnPostgres:
    """A private PostgreSQL the test may stop and start again (never the machine's shared one)."""

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="haif-pg-"))
        self._data = self._root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self._root, "postgres")
        subprocess.run(
            [*self._as_user, _pg_bin("initdb"), "-D", str(self._data), "-U", "postgres",
             "--auth=trust"],
            check=True,
            capture_output=True,
        )

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self._as_user, _pg_bin("pg_ctl"), "-D", str(self._data), *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._ctl(
            "-l", str(self._root / "log"), "-w", "start",
            "-o", f"-p {self.port} -k {self._root} -c listen_addresses=127.0.0.1",
        )  # fmt: skip
        wait_for(lambda: _pg_answers(self.url), START_TIMEOUT_S, 0.1, "PostgreSQL to start")

    def stop(self) -> None:
        """Immediate shutdown: connections are cut, as when the server dies."""
        self._ctl("-m", "immediate", "-w", "stop")

    def close(self) -> None:
        subprocess.run(
            [*self._as_user, _pg_bin("pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self._root, ignore_errors=True)


@contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()
