"""P2P peers: a caller's Noise public key mapped to the tenant it acts as (like an API token).

``haif p2p peers add|list|remove`` manage the rows; the P2P shim's admission looks a key
up with :func:`find_peer` (one round trip: the tenant and its limits), besides the keys
of ``p2p.peers`` in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from haif.exceptions import Conflict, NotFound
from haif.p2p.keys import parse_public_key
from haif.store.models import P2PPeer, Quota, Tenant

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session


@dataclass(frozen=True)
class PeerInfo:
    """A peer's row joined with its tenant and quota, as admission needs it."""

    public_key: str
    tenant_id: int
    tenant: str
    limits: tuple[int | None, int | None, int | None, int | None]
    suspended: bool = False


def find_peer(conn: Connection, public_key: str) -> PeerInfo | None:
    """The peer with ``public_key`` (64 hex, any case), its tenant and limits; None if unknown."""
    row = conn.execute(
        select(
            P2PPeer.public_key,
            P2PPeer.tenant_id,
            Tenant.name,
            Quota.requests_per_minute,
            Quota.tokens_per_minute,
            Quota.tokens_per_day,
            Quota.max_concurrent,
            Tenant.suspended_at,
        )
        .join(Tenant, Tenant.id == P2PPeer.tenant_id)
        .outerjoin(Quota, Quota.tenant_id == P2PPeer.tenant_id)
        .where(P2PPeer.public_key == public_key.strip().lower())
    ).one_or_none()
    if row is None:
        return None
    return PeerInfo(public_key=row[0], tenant_id=row[1], tenant=row[2], limits=(row[3], row[4], row[5], row[6]),
                    suspended=row[7] is not None)


class PeerRepository:
    """Adding, listing and removing P2P peers (CLI)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, public_key: str, tenant: Tenant) -> P2PPeer:
        """Maps ``public_key`` to ``tenant``.

        Raises:
            InvalidRequest: not a 64-hex-character key.
            Conflict: the key is mapped already (remove it first to move it).
        """
        key = parse_public_key(public_key)
        existing = self.session.get(P2PPeer, key)
        if existing is not None:
            owner = self.session.get(Tenant, existing.tenant_id)
            raise Conflict(f"peer {key} is mapped to tenant {owner.name if owner else existing.tenant_id!r} already")
        row = P2PPeer(public_key=key, tenant_id=tenant.id, created_at=datetime.now(UTC))
        self.session.add(row)
        try:
            self.session.flush()
        except IntegrityError:
            raise Conflict(f"peer {key} is mapped already") from None
        return row

    def find(self, public_key: str) -> P2PPeer | None:
        return self.session.get(P2PPeer, parse_public_key(public_key))

    def list(self, tenant: Tenant | None = None) -> list[tuple[P2PPeer, str]]:
        """Every peer with its tenant's name, by key."""
        stmt = select(P2PPeer, Tenant.name).join(Tenant, Tenant.id == P2PPeer.tenant_id)
        if tenant is not None:
            stmt = stmt.where(P2PPeer.tenant_id == tenant.id)
        return [(p, n) for p, n in self.session.execute(stmt.order_by(P2PPeer.public_key)).all()]

    def remove(self, public_key: str) -> P2PPeer:
        """Raises: InvalidRequest (not a key), NotFound (not mapped)."""
        row = self.find(public_key)
        if row is None:
            raise NotFound(f"no P2P peer {parse_public_key(public_key)}")
        self.session.delete(row)
        self.session.flush()
        return row
