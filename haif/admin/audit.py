"""The audit log: one row per admin action, whichever way it came (the admin API, the CLI
over HTTP, the CLI on the database). Written in the transaction of the change it records,
so a change without its row cannot happen; the API only ever appends and reads.

A row says when, who (``token:ID``, ``oidc:ISSUER#SUB``, ``cli:USER``), the action, its
target, the change (before and after: never a secret; a new token's secret is not in
``after``), the request id and the client's address.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import insert, select

from haif.admin import pages
from haif.admin.operations import iso
from haif.store.models import AuditRow, AuthChange

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from haif.admin.operations import Page

Role = Literal["admin", "tenant_admin"]
# Never written to a row, whatever a record holds.
SECRET_KEYS = frozenset({"token", "secret", "secret_hash"})


@dataclass(frozen=True)
class Actor:
    """Who performs admin actions: their name for the log, their role, and (a
    ``tenant_admin``) the one tenant they may act on."""

    name: str
    role: Role = "admin"
    tenant: str | None = None
    request_id: str | None = None
    client: str | None = None

    @classmethod
    def cli(cls) -> Actor:
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (containers)
            user = "unknown"
        return cls(name=f"cli:{user}")


def _clean(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {k: v for k, v in value.items() if k not in SECRET_KEYS}


def record(
    session: Session,
    actor: Actor,
    action: str,
    target: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    session.execute(
        insert(AuditRow).values(
            at=datetime.now(UTC),
            actor=actor.name[:600],
            action=action,
            target=target[:512],
            before=_clean(before),
            after=_clean(after),
            request_id=actor.request_id,
            client=actor.client,
        )
    )


def auth_changed(session: Session, what: str) -> int:
    """Record a change every Gateway's credential cache must see now; the new auth epoch."""
    row = AuthChange(at=datetime.now(UTC), what=what[:256])
    session.add(row)
    session.flush()
    return row.id


def auth_epoch(session_or_conn: Any) -> int:
    from sqlalchemy import func

    return session_or_conn.execute(select(func.coalesce(func.max(AuthChange.id), 0))).scalar_one()


def as_record(row: AuditRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": iso(row.at),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "before": row.before,
        "after": row.after,
        "request_id": row.request_id,
        "client": row.client,
    }


def list_rows(
    session: Session,
    action: str | None,
    actor: str | None,
    target: str | None,
    since: datetime | None,
    cursor: str | None,
    limit: int,
) -> Page:
    """Newest first."""
    key = pages.decode(cursor, (int,))
    stmt = select(AuditRow)
    if key is not None:
        stmt = stmt.where(AuditRow.id < key[0])
    if action is not None:
        stmt = stmt.where(AuditRow.action == action)
    if actor is not None:
        stmt = stmt.where(AuditRow.actor == actor)
    if target is not None:
        stmt = stmt.where(AuditRow.target == target)
    if since is not None:
        stmt = stmt.where(AuditRow.at >= since)
    rows = session.scalars(stmt.order_by(AuditRow.id.desc()).limit(limit + 1)).all()
    return pages.page(rows, limit, as_record, lambda r: (r.id,))
