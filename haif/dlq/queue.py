"""The DLQ both backends make: Redis Streams first (when configured), the metadata store's
table as the embedded default and as the fallback while Redis is down.

Reads and removals look in both places, since entries put while Redis was down stay in
the table; an id found in both (a put whose answer Redis lost) is listed once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from haif.dlq import _table
from haif.exceptions import StoreUnavailable

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.dlq._stream import RedisStream
    from haif.dlq.entry import DeadLetter
    from haif.store.db import Database

logger = logging.getLogger("haif.dlq")

Backend = Literal["redis", "database"]


class DeadLetterQueue:
    """Blocking calls: from async code, run them on the database threads (``Database.run``)."""

    def __init__(self, config: HaifConfig, db: Database) -> None:
        self._db = db
        self._retry_after_s = config.quotas.redis_retry_after_s
        self._redis_down_until = 0.0
        self.redis_error: str | None = None  # why the last Redis call failed, for the CLI
        self._redis: RedisStream | None = None
        if config.dlq_on_redis():
            from haif.dlq._stream import RedisStream

            self._redis = RedisStream(config.redis, config.dlq)

    @property
    def on_redis(self) -> bool:
        return self._redis is not None

    def redis_usable(self) -> bool:
        """Redis is configured and did not fail in the last ``quotas.redis_retry_after_s``."""
        return self._redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        self._redis_down_until = time.monotonic() + self._retry_after_s
        self.redis_error = f"Redis is unavailable: {type(exc).__name__}"
        logger.warning("DLQ: Redis unavailable (%s); using the metadata store", exc)

    # --- writes ------------------------------------------------------------------------------

    def put(self, entry: DeadLetter) -> Backend:
        """Store ``entry`` once (a second put of the same job replaces it); where it went.

        Raises:
            StoreUnavailable: neither Redis nor the metadata store took it.
        """
        from redis.exceptions import RedisError

        if self._redis is not None and self.redis_usable():
            try:
                self._redis.put(entry)
                self._redis_down_until = 0.0
                return "redis"
            except RedisError as exc:
                self._redis_failed(exc)
        self.put_in_table(entry)
        return "database"

    def put_in_table(self, entry: DeadLetter) -> None:
        """Raises: StoreUnavailable."""
        with self._db.begin() as conn:
            _table.put(conn, entry)

    # --- reads and removals (the CLI) ----------------------------------------------------------

    def _from_redis(self, call):  # noqa: ANN001, ANN202
        """``call(redis)``, or None when Redis is not configured or does not answer."""
        from redis.exceptions import RedisError

        if self._redis is None:
            return None
        try:
            return call(self._redis)
        except RedisError as exc:
            self._redis_failed(exc)
            return None

    def get(self, entry_id: str) -> DeadLetter | None:
        found = self._from_redis(lambda r: r.get(entry_id))
        if found is not None:
            return found
        with self._db.connect() as conn:
            return _table.get(conn, entry_id)

    def newest(self, limit: int, tenant: str | None = None) -> list[DeadLetter]:
        """The ``limit`` most recent entries (of ``tenant``), newest first."""
        merged: dict[str, DeadLetter] = {}
        for entry in self._from_redis(lambda r: r.newest(limit, tenant)) or []:
            merged[entry.id] = entry
        with self._db.connect() as conn:
            for entry in _table.newest(conn, limit, tenant):
                if entry.id not in merged or entry.dead_at > merged[entry.id].dead_at:
                    merged[entry.id] = entry
        ordered = sorted(merged.values(), key=lambda e: (e.dead_at, e.id), reverse=True)
        return ordered[:limit]

    def remove(self, entry_id: str) -> bool:
        """Remove the entry from both backends; whether there was one.

        Raises:
            StoreUnavailable: Redis is configured and did not answer (nothing is half-removed
                from it; the table's copy, if any, is removed).
        """
        in_redis = self._from_redis(lambda r: r.remove(entry_id))
        with self._db.begin() as conn:
            in_table = _table.remove(conn, entry_id)
        if in_redis is None and self._redis is not None:
            raise StoreUnavailable(self.redis_error or "Redis is unavailable")
        return bool(in_redis) or in_table

    def remove_all(self) -> int:
        """Remove every entry; how many there were.

        Raises:
            StoreUnavailable: Redis is configured and did not answer.
        """
        in_redis = self._from_redis(lambda r: r.remove_all())
        with self._db.begin() as conn:
            in_table = _table.remove_all(conn)
        if in_redis is None and self._redis is not None:
            raise StoreUnavailable(self.redis_error or "Redis is unavailable")
        return (in_redis or 0) + in_table

    def ping(self) -> None:
        """Raises: redis.RedisError when Redis is configured and does not answer."""
        if self._redis is not None:
            self._redis.ping()

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
