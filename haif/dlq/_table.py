"""The DLQ in the metadata store: the ``dead_letters`` table (the embedded default, and
where entries go while Redis is down). One row per job: a second put replaces it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select

from haif.dlq.entry import DeadLetter
from haif.store.models import DeadLetter as Row

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

table = Row.__table__


def put(conn: Connection, entry: DeadLetter) -> None:
    """Insert ``entry``, replacing an earlier one of the same job (in the caller's transaction)."""
    conn.execute(delete(table).where(table.c.id == entry.id))
    conn.execute(table.insert().values(**entry.model_dump()))


def get(conn: Connection, entry_id: str) -> DeadLetter | None:
    row = conn.execute(select(table).where(table.c.id == entry_id)).one_or_none()
    return DeadLetter.model_validate(dict(row._mapping)) if row is not None else None


def newest(conn: Connection, limit: int, tenant: str | None = None) -> list[DeadLetter]:
    stmt = select(table).order_by(table.c.dead_at.desc(), table.c.id).limit(limit)
    if tenant is not None:
        stmt = stmt.where(table.c.tenant == tenant)
    return [DeadLetter.model_validate(dict(r._mapping)) for r in conn.execute(stmt).all()]


def remove(conn: Connection, entry_id: str) -> bool:
    return bool(conn.execute(delete(table).where(table.c.id == entry_id)).rowcount)


def remove_all(conn: Connection) -> int:
    count = conn.execute(select(func.count()).select_from(table)).scalar_one()
    conn.execute(delete(table))
    return int(count)
