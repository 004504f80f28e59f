"""The request's two writes on PostgreSQL from the event loop: psycopg's async driver.

The Gateway runs on its replica's event loop. Handing each write to a thread costs a
thread switch and, under load, waits for the GIL; here the single-statement
reservation and settlement of ``fastpath`` are sent from the loop itself, over a small
pool of autocommit connections. Their SQL is compiled once from those same SQLAlchemy
statements, so there is one definition of what they do. Everything else (the
reference path, reads, the CLI) stays on the synchronous engine.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import make_url

from haif.exceptions import StoreUnavailable
from haif.store import fastpath

if TYPE_CHECKING:
    from datetime import datetime

    from haif.config import HaifConfig
    from haif.store.ledger import JobRequest, Outcome, Reservation

logger = logging.getLogger("haif.store")


class _Compiled:
    """A statement as SQL text plus its constant parameters."""

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=psycopg_dialect.dialect())
        self.sql = str(compiled)
        self._compiled = compiled

    def params(self, values: dict[str, Any]) -> dict[str, Any]:
        return self._compiled.construct_params(values)


class AsyncWrites:
    """Reservation and settlement over ``size`` async autocommit connections."""

    def __init__(
        self, url: str, *, size: int, connect_timeout_s: float, statement_timeout_ms: int
    ) -> None:
        parsed = make_url(url)
        self._connect_kwargs: dict[str, Any] = {
            "host": parsed.host,
            "port": parsed.port or 5432,
            "user": parsed.username,
            "password": parsed.password,
            "dbname": parsed.database,
            "connect_timeout": max(1, round(connect_timeout_s)),
            "autocommit": True,
            **(
                {"options": f"-c statement_timeout={statement_timeout_ms}"}
                if statement_timeout_ms
                else {}
            ),
            **{k: v for k, v in parsed.query.items() if isinstance(v, str)},
        }
        self._size = size
        self._idle: asyncio.Queue[Any] | None = None
        self._opened = 0
        self._reserve = _Compiled(fastpath._RESERVE_PG)
        self._insert_job = _Compiled(fastpath._INSERT_JOB)
        self._settle = {key: _Compiled(stmt) for key, stmt in fastpath._SETTLE_PG.items()}
        self._settle_unwritten = {
            key: _Compiled(stmt) for key, stmt in fastpath._SETTLE_UNWRITTEN_PG.items()
        }
        self._take_lease = _Compiled(fastpath._TAKE_LEASE)
        self._return_lease = _Compiled(fastpath._RETURN_LEASE)
        self._record_job = _Compiled(fastpath._RECORD_JOB_PG)

    @classmethod
    def from_config(cls, config: HaifConfig) -> AsyncWrites | None:
        """For a PostgreSQL store; None for SQLite (no asynchronous driver in the standard library)."""
        from haif.store.db import normalize_url

        url = normalize_url(config.database_url())
        if make_url(url).get_backend_name() != "postgresql":
            return None
        db = config.database
        return cls(
            url,
            size=db.pool_size,
            connect_timeout_s=db.connect_timeout_s,
            statement_timeout_ms=db.statement_timeout_ms,
        )

    async def _run(self, compiled: _Compiled, values: dict[str, Any]) -> Any:
        import psycopg

        if self._idle is None:
            self._idle = asyncio.Queue()
        if self._idle.empty() and self._opened < self._size:
            self._opened += 1
            try:
                conn = await psycopg.AsyncConnection.connect(**self._connect_kwargs)
            except psycopg.Error as exc:
                self._opened -= 1
                logger.warning("metadata store unavailable: %s", exc)
                raise StoreUnavailable("the metadata store is unavailable; retry later") from None
        else:
            conn = await self._idle.get()
        healthy = False
        try:
            cursor = await conn.execute(compiled.sql, compiled.params(values))
            row = await cursor.fetchone() if cursor.description is not None else None
            healthy = True
            return row
        except psycopg.OperationalError as exc:
            logger.warning("metadata store unavailable: %s", exc)
            # The server went away: the idle connections are dead too. Closing them now
            # spares the first requests after its return one failure each.
            await self._drop_idle()
            raise StoreUnavailable("the metadata store is unavailable; retry later") from None
        finally:
            if healthy or not conn.broken and conn.info.transaction_status == 0:  # IDLE
                self._idle.put_nowait(conn)
            else:
                self._opened -= 1
                await conn.close()

    async def reserve(self, req: JobRequest, now: datetime) -> Reservation | None:
        """``fastpath.reserve`` from the event loop; None: the reference path decides."""
        if req.idempotency_key is not None:
            return None
        if not fastpath._needs_lock(req.limits, req.count_requests):
            await self._run(self._insert_job, fastpath._job_params(req, now))
            return fastpath._reservation(req, now, 0, False)
        row = await self._run(self._reserve, fastpath._params(req, now))
        if row is None:
            return None
        return fastpath._reservation(req, now, int(row[0]), bool(row[1]))

    async def settle(self, res: Reservation, out: Outcome) -> bool:
        row = await self._run(
            self._settle[(res.holds_quota, out.bill)], fastpath._settle_params(res, out)
        )
        return bool(row[0])

    async def settle_unwritten(
        self, res: Reservation, out: Outcome, req: JobRequest, now: datetime
    ) -> bool:
        """Settle a job whose row was never written (admitted on a lease at ``now``, and
        shorter than its row's delay): the row is inserted closed, in the same one
        statement. False if it is there already (a retried settlement)."""
        row = await self._run(
            self._settle_unwritten[(res.holds_quota, out.bill)],
            {
                **fastpath._settle_params(res, out),
                **fastpath._unwritten_params(req, now, res.reserved_tokens),
            },
        )
        return bool(row[0])

    async def take_lease(
        self, tenant_id: int, requests: int, tokens: int, now: datetime
    ) -> tuple[int, int, datetime, datetime] | None:
        """Count a block of ``requests`` and ``tokens`` for a lease, if at least as much
        again is left in every window. Returns what the tenant's limits made it count
        (0: that limit is off) and the starts of the minute and day windows; None when
        the block does not fit (or the tenant has a concurrency limit)."""
        row = await self._run(
            self._take_lease,
            {
                "b_tenant": tenant_id,
                "b_now": now,
                "b_minute_cutoff": now - fastpath.MINUTE,
                "b_day_cutoff": now - fastpath.DAY,
                "b_count_requests": requests,
                "b_tokens": tokens,
            },
        )
        if row is None:
            return None
        return int(row[0]), int(row[1]), row[2], row[3]

    async def return_lease(
        self,
        tenant_id: int,
        requests: int,
        tokens: int,
        minute_start: datetime,
        day_start: datetime,
    ) -> None:
        """Give back what a lease counted in the windows that started at ``minute_start``
        and ``day_start`` did not hand out."""
        await self._run(
            self._return_lease,
            {
                "b_tenant": tenant_id,
                "b_requests": requests,
                "b_tokens": tokens,
                "b_minute_start": minute_start,
                "b_day_start": day_start,
            },
        )

    async def record_job(self, req: JobRequest, now: datetime, reserved_tokens: int) -> None:
        """Write the row of a job admitted on a lease (nothing if it is there already)."""
        await self._run(
            self._record_job, {**fastpath._job_params(req, now), "b_tokens": reserved_tokens}
        )

    async def _drop_idle(self) -> None:
        while self._idle is not None and not self._idle.empty():
            conn = self._idle.get_nowait()
            self._opened -= 1
            await conn.close()

    async def close(self) -> None:
        await self._drop_idle()
