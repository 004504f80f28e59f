"""The tenancy side of the admin operations: tenants, tokens, jobs, usage, P2P peers, the
audit log. Each call is one transaction on the metadata store: the change, its audit row
and (a revocation, a suspension) the auth change every Gateway replica follows.

Roles: ``admin`` may do everything; ``tenant_admin`` only its own tenant's tokens (never
one with the ``admin`` scope), jobs and usage; anything else is a 403.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from haif.admin import audit, pages
from haif.admin.operations import DEFAULT_PAGE, QUOTA_FIELDS, Page, Priority, Record, iso
from haif.exceptions import InvalidRequest, NotFound, PermissionDenied
from haif.store.models import ApiToken, Job, P2PPeer, Quota, Tenant, UsageRecord

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from haif.admin.audit import Actor
    from haif.config import HaifConfig
    from haif.store.db import Database

PRIORITIES = ("high", "normal", "low")
TOKEN_STATES = ("active", "expired", "revoked")
TENANT_ADMIN_SCOPES = frozenset({"inference", "tenant_admin"})


def tenant_record(tenant: Tenant, quota: Quota | None) -> Record:
    return {
        "id": tenant.id,
        "name": tenant.name,
        **{f: getattr(quota, f) if quota is not None else None for f in QUOTA_FIELDS},
        "priority": tenant.priority,
        "suspended": tenant.suspended_at is not None,
        "created_at": iso(tenant.created_at),
    }


def token_record(token: ApiToken, tenant: str, now: datetime | None = None) -> Record:
    now = now or datetime.now(UTC)
    state = (
        "revoked" if token.revoked_at
        else "expired" if token.expires_at is not None and token.expires_at <= now
        else "active"
    )
    return {
        "id": token.id,
        "prefix": token.prefix,
        "tenant": tenant,
        "name": token.name,
        "scopes": token.scopes.split(),
        "models": token.allowed_models,
        "created_at": iso(token.created_at),
        "expires_at": iso(token.expires_at),
        "revoked_at": iso(token.revoked_at),
        "state": state,
    }


def _priority(value: Any) -> str:
    if value not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}")
    return value


class TenancyOperations:
    """Tenants, tokens, jobs, usage, peers and the audit log, as ``actor`` may see them."""

    def __init__(self, db: Database, config: HaifConfig, actor: Actor) -> None:
        self._db = db
        self._config = config
        self.actor = actor
        self.auth_epoch: int | None = None  # set when a call changed what authenticates

    # --- roles ---------------------------------------------------------------------------

    def _admin(self) -> None:
        if self.actor.role != "admin":
            raise PermissionDenied("this needs the admin scope")

    def _own(self, tenant: str | None) -> str | None:
        """The tenant a call may look at: any (admin), else the actor's own."""
        if self.actor.role == "admin":
            return tenant
        if tenant is not None and tenant != self.actor.tenant:
            raise PermissionDenied("a tenant_admin token acts on its own tenant only")
        return self.actor.tenant

    def _auth_changed(self, session: Session, what: str) -> None:
        self.auth_epoch = audit.auth_changed(session, what)

    # --- tenants -------------------------------------------------------------------------

    def _tenant(self, session: Session, name: str) -> tuple[Tenant, Quota | None]:
        row = session.execute(
            select(Tenant, Quota).outerjoin(Quota, Quota.tenant_id == Tenant.id).where(Tenant.name == name)
        ).one_or_none()
        if row is None:
            raise NotFound(f"no tenant named {name!r}")
        return row[0], row[1]

    def create_tenant(self, name: str, limits: dict[str, int | None], priority: Priority | None = None) -> Record:
        from haif.store.quotas import QuotaLimits
        from haif.store.tenants import TenantRepository

        self._admin()
        with self._db.session() as session:
            tenant = TenantRepository(session).create(name, QuotaLimits(**limits))
            if priority is not None:
                tenant.priority = _priority(priority)
            session.flush()
            after = tenant_record(*self._tenant(session, name))
            audit.record(session, self.actor, "tenant.create", f"tenant:{name}", None, after)
        return after

    def list_tenants(self, cursor: str | None = None, limit: int = DEFAULT_PAGE, suspended: bool | None = None) -> Page:
        self._admin()
        pages.check_limit(limit)
        key = pages.decode(cursor, (int,))
        stmt = select(Tenant, Quota).outerjoin(Quota, Quota.tenant_id == Tenant.id)
        if key is not None:
            stmt = stmt.where(Tenant.id > key[0])
        if suspended is not None:
            stmt = stmt.where(Tenant.suspended_at.is_not(None) if suspended else Tenant.suspended_at.is_(None))
        with self._db.session() as session:
            rows = session.execute(stmt.order_by(Tenant.id).limit(limit + 1)).all()
            return pages.page(rows, limit, lambda r: tenant_record(r[0], r[1]), lambda r: (r[0].id,))

    def get_tenant(self, name: str) -> Record:
        self._admin()
        with self._db.session() as session:
            return tenant_record(*self._tenant(session, name))

    def update_tenant(self, name: str, changes: dict[str, Any]) -> Record:
        from haif.store.tenants import TenantRepository

        self._admin()
        unknown = set(changes) - {*QUOTA_FIELDS, "priority", "suspended"}
        if unknown:
            raise InvalidRequest(f"unknown tenant fields: {sorted(unknown)}")
        if not changes:
            raise InvalidRequest("give at least one field to change")
        with self._db.session() as session:
            tenant, quota = self._tenant(session, name)
            before = tenant_record(tenant, quota)
            limits = {k: v for k, v in changes.items() if k in QUOTA_FIELDS}
            if limits:
                TenantRepository(session).set_limits(name, limits)
            if "priority" in changes:
                tenant.priority = _priority(changes["priority"])
            if "suspended" in changes:
                if not isinstance(changes["suspended"], bool):
                    raise InvalidRequest("suspended must be true or false")
                if changes["suspended"] != (tenant.suspended_at is not None):
                    tenant.suspended_at = datetime.now(UTC) if changes["suspended"] else None
            session.flush()
            session.expire_all()
            after = tenant_record(*self._tenant(session, name))
            if after != before:  # cached principals carry the limits and the suspension
                self._auth_changed(session, f"tenant:{name}")
            action = "tenant.update"
            if set(changes) == {"suspended"}:
                action = "tenant.suspend" if changes["suspended"] else "tenant.resume"
            audit.record(session, self.actor, action, f"tenant:{name}", before, after)
        return after

    # --- tokens --------------------------------------------------------------------------

    def create_token(
        self,
        tenant: str,
        scopes: list[str] | None = None,
        models: list[str] | None = None,
        expires_in_s: float | None = None,
        name: str | None = None,
    ) -> Record:
        from haif.store.tenants import TenantRepository
        from haif.store.tokens import TokenRepository, parse_scopes

        self._own(tenant)
        parsed = parse_scopes(scopes)
        if self.actor.role != "admin" and not set(parsed) <= TENANT_ADMIN_SCOPES:
            raise PermissionDenied("a tenant_admin token cannot create a token with the admin scope")
        allowed = sorted({m.strip() for m in models or [] if m.strip()}) or None
        with self._db.session() as session:
            owner = TenantRepository(session).get(tenant)
            row, secret = TokenRepository(session).create(
                owner, scopes=parsed, allowed_models=allowed, expires_in_s=expires_in_s, name=name
            )
            after = token_record(row, tenant)
            audit.record(session, self.actor, "token.create", f"token:{row.id}", None, after)
        return {**after, "token": secret}

    def list_tokens(
        self, tenant: str | None = None, state: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        pages.check_limit(limit)
        tenant = self._own(tenant)
        if state is not None and state not in TOKEN_STATES:
            raise InvalidRequest(f"state must be one of {', '.join(TOKEN_STATES)}")
        key = pages.decode(cursor, (int,))
        now = datetime.now(UTC)
        stmt = select(ApiToken, Tenant.name).join(Tenant, Tenant.id == ApiToken.tenant_id)
        if key is not None:
            stmt = stmt.where(ApiToken.id > key[0])
        if tenant is not None:
            stmt = stmt.where(Tenant.name == tenant)
        if state == "revoked":
            stmt = stmt.where(ApiToken.revoked_at.is_not(None))
        elif state == "expired":
            stmt = stmt.where(ApiToken.revoked_at.is_(None), ApiToken.expires_at <= now)
        elif state == "active":
            stmt = stmt.where(
                ApiToken.revoked_at.is_(None), (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now)
            )
        with self._db.session() as session:
            rows = session.execute(stmt.order_by(ApiToken.id).limit(limit + 1)).all()
            return pages.page(rows, limit, lambda r: token_record(r[0], r[1], now), lambda r: (r[0].id,))

    def revoke_token(self, id_or_token: str, *, secret_ok: bool = True) -> Record:
        """By id, prefix, or (``secret_ok``: the CLI on the database) the token itself; the
        admin API passes ``secret_ok=False``: a secret never travels in a URL."""
        from haif.store.tokens import TokenRepository

        with self._db.session() as session:
            repo = TokenRepository(session)
            row = repo.find(id_or_token, secret_ok=secret_ok)
            if row is None:
                raise NotFound("no such token")
            tenant = session.get(Tenant, row.tenant_id)
            if self.actor.role != "admin" and tenant.name != self.actor.tenant:
                raise NotFound("no such token")  # another tenant's token: as if absent
            before = token_record(row, tenant.name)
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
                self._auth_changed(session, f"token:{row.id}")
            session.flush()
            after = token_record(row, tenant.name)
            audit.record(session, self.actor, "token.revoke", f"token:{row.id}", before, after)
        return after

    # --- jobs and usage ------------------------------------------------------------------

    def list_jobs(
        self, tenant: str | None = None, state: str | None = None, model: str | None = None,
        cursor: str | None = None, limit: int = DEFAULT_PAGE,
    ) -> Page:
        pages.check_limit(limit)
        tenant = self._own(tenant)
        key = pages.decode(cursor, (str, str))
        stmt = select(Job, Tenant.name).join(Tenant, Tenant.id == Job.tenant_id)
        if key is not None:
            at = datetime.fromisoformat(key[0])
            stmt = stmt.where((Job.created_at < at) | ((Job.created_at == at) & (Job.id > key[1])))
        if tenant is not None:
            stmt = stmt.where(Tenant.name == tenant)
        if state is not None:
            stmt = stmt.where(Job.state == state)
        if model is not None:
            stmt = stmt.where(Job.model == model)
        with self._db.session() as session:
            rows = session.execute(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit + 1)).all()
            return pages.page(
                rows, limit, lambda r: _job_record(r[0], r[1]),
                lambda r: (r[0].created_at.astimezone(UTC).isoformat(), r[0].id),
            )

    def list_usage(
        self, tenant: str | None = None, since: datetime | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        from haif.store.usage import _rows_query, export_row

        pages.check_limit(limit)
        tenant = self._own(tenant)
        key = pages.decode(cursor, (int,))
        with self._db.session() as session:
            tenant_id = self._tenant(session, tenant)[0].id if tenant is not None else None
            stmt = _rows_query(since, tenant_id)
            if key is not None:
                stmt = stmt.where(UsageRecord.id > key[0])
            rows = session.execute(stmt.order_by(UsageRecord.id).limit(limit + 1)).all()
            return pages.page(rows, limit, export_row, lambda r: (r.id,))

    # --- P2P peers -----------------------------------------------------------------------

    def list_peers(self, tenant: str | None = None, cursor: str | None = None, limit: int = DEFAULT_PAGE) -> Page:
        self._admin()
        pages.check_limit(limit)
        key = pages.decode(cursor, (str,))
        stmt = select(P2PPeer, Tenant.name).join(Tenant, Tenant.id == P2PPeer.tenant_id)
        if key is not None:
            stmt = stmt.where(P2PPeer.public_key > key[0])
        if tenant is not None:
            stmt = stmt.where(Tenant.name == tenant)
        with self._db.session() as session:
            rows = session.execute(stmt.order_by(P2PPeer.public_key).limit(limit + 1)).all()
            result = pages.page(rows, limit, lambda r: _peer_record(r[0], r[1]), lambda r: (r[0].public_key,))
        if cursor is None:  # the config's peers, once, on the first page
            result["data"] += [
                {"public_key": k, "tenant": t, "created_at": None, "source": "config"}
                for k, t in sorted(self._config.p2p.peers.items()) if tenant in (None, t)
            ]
        return result

    def add_peer(self, public_key: str, tenant: str) -> Record:
        from haif.store.peers import PeerRepository
        from haif.store.tenants import TenantRepository

        self._admin()
        with self._db.session() as session:
            row = PeerRepository(session).add(public_key, TenantRepository(session).get(tenant))
            after = _peer_record(row, tenant)
            self._auth_changed(session, f"peer:{row.public_key}")  # its refusal may be cached
            audit.record(session, self.actor, "peer.add", f"peer:{row.public_key}", None, after)
        return after

    def remove_peer(self, public_key: str) -> Record:
        from haif.store.peers import PeerRepository

        self._admin()
        with self._db.session() as session:
            row = PeerRepository(session).remove(public_key)
            before = _peer_record(row, session.get(Tenant, row.tenant_id).name)
            self._auth_changed(session, f"peer:{row.public_key}")
            audit.record(session, self.actor, "peer.remove", f"peer:{row.public_key}", before, None)
        return before

    # --- audit ---------------------------------------------------------------------------

    def list_audit(
        self, action: str | None = None, actor: str | None = None, target: str | None = None,
        since: datetime | None = None, cursor: str | None = None, limit: int = DEFAULT_PAGE,
    ) -> Page:
        self._admin()
        pages.check_limit(limit)
        with self._db.session() as session:
            return audit.list_rows(session, action, actor, target, since, cursor, limit)


def _job_record(job: Job, tenant: str) -> Record:
    return {
        "id": job.id,
        "tenant": tenant,
        "kind": job.kind,
        "model": job.model,
        "version": job.version,
        "state": job.state,
        "caller": job.caller,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "worker": job.worker,
        "gateway": job.gateway,
        "error": job.error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def _peer_record(row: P2PPeer, tenant: str) -> Record:
    return {"public_key": row.public_key, "tenant": tenant, "created_at": iso(row.created_at), "source": "store"}
