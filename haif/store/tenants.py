"""Tenants and their quota rows (one each, created together)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from haif.exceptions import Conflict, InvalidRequest, NotFound
from haif.store.models import Quota, Tenant
from haif.store.quotas import QuotaLimits

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")
# What the columns hold (INTEGER, BIGINT).
LIMIT_MAX = {
    "requests_per_minute": 2**31 - 1,
    "max_concurrent": 2**31 - 1,
    "tokens_per_minute": 2**63 - 1,
    "tokens_per_day": 2**63 - 1,
}


def check_limits(limits: dict[str, int | None]) -> dict[str, int | None]:
    """Raises: InvalidRequest (an unknown field, a negative or too large limit)."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown quota fields: {sorted(unknown)}")
    for field, value in limits.items():
        if value is not None and not 0 <= value <= LIMIT_MAX[field]:
            raise InvalidRequest(f"{field} must be between 0 and {LIMIT_MAX[field]}")
    return limits


def check_name(name: str) -> str:
    if not TENANT_NAME.match(name):
        raise InvalidRequest(
            "a tenant name is 1-64 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class TenantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, name: str, limits: QuotaLimits | None = None) -> Tenant:
        """Raises: Conflict (the name exists), InvalidRequest (a bad name)."""
        check_name(name)
        limits = limits or QuotaLimits()
        check_limits(limits.as_dict())
        if self.find(name) is not None:
            raise Conflict(f"tenant {name!r} already exists")
        tenant = Tenant(name=name, created_at=datetime.now(UTC))
        self.session.add(tenant)
        try:
            self.session.flush()
        except IntegrityError:
            raise Conflict(f"tenant {name!r} already exists") from None
        self.session.add(Quota(tenant_id=tenant.id, **limits.as_dict()))
        self.session.flush()
        return tenant

    def ensure(self, name: str) -> Tenant:
        return self.find(name) or self.create(name)

    def find(self, name: str) -> Tenant | None:
        return self.session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()

    def get(self, name: str) -> Tenant:
        tenant = self.find(name)
        if tenant is None:
            raise NotFound(f"no tenant named {name!r}")
        return tenant

    def list(self) -> list[tuple[Tenant, Quota | None]]:
        stmt = (
            select(Tenant, Quota)
            .outerjoin(Quota, Quota.tenant_id == Tenant.id)
            .order_by(Tenant.name)
        )
        return [(t, q) for t, q in self.session.execute(stmt).all()]

    def set_limits(self, name: str, changes: dict[str, int | None]) -> Quota:
        """Change some limits (``None``: unlimited); the others keep their values."""
        check_limits(changes)
        tenant = self.get(name)
        quota = self.session.get(Quota, tenant.id)
        if quota is None:
            quota = Quota(tenant_id=tenant.id)
            self.session.add(quota)
        for field, value in changes.items():
            setattr(quota, field, value)
        quota.updated_at = datetime.now(UTC)
        self.session.flush()
        return quota


def tenant_limits(conn: Connection, tenant_id: int) -> tuple[str, QuotaLimits] | None:
    """A tenant's name and limits by id (for trusted in-cluster callers: DLQ replays)."""
    row = conn.execute(
        select(
            Tenant.name,
            Quota.requests_per_minute,
            Quota.tokens_per_minute,
            Quota.tokens_per_day,
            Quota.max_concurrent,
        )
        .outerjoin(Quota, Quota.tenant_id == Tenant.id)
        .where(Tenant.id == tenant_id)
    ).one_or_none()
    if row is None:
        return None
    return row.name, QuotaLimits(*row[1:])
