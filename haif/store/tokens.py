"""API tokens: ``haif_<prefix>_<secret>``, shown once, stored as a hash, found by prefix.

The prefix is not secret: it names the token in listings and finds its row. The secret
is 256 random bits, so one SHA-256 of the whole token is as good as a slow hash here;
the stored hash is compared in constant time. A key that does not have this shape
(``auth.dev_api_key`` set by hand in a config) is found by a prefix derived from its
hash instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select

from haif.exceptions import InvalidRequest, NotFound
from haif.store.models import ApiToken, Quota, Tenant

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

TOKEN_SCHEME = "haif_"
PREFIX_CHARS = 12
SCOPES = frozenset({"inference", "admin", "tenant_admin"})
DEFAULT_SCOPES = ("inference",)
MAX_TOKEN_CHARS = 512
MIN_FOREIGN_KEY_CHARS = 16
MAX_NAME_CHARS = 128
MAX_EXPIRES_IN_S = 100 * 365 * 86400

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_TOKEN = re.compile(rf"^haif_([a-z0-9]{{{PREFIX_CHARS}}})_([A-Za-z0-9_-]{{32,128}})$")
# Printable ASCII only: anything else cannot be a key HAIF issued or accepted.
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_DERIVED = "k-"  # generated prefixes have no '-', so the two kinds never collide


def new_token() -> tuple[str, str]:
    """A fresh ``(token, prefix)``."""
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_CHARS))
    return f"{TOKEN_SCHEME}{prefix}_{secrets.token_urlsafe(32)}", prefix


def lookup_prefix(token: str) -> str | None:
    """The prefix that finds ``token``'s row, or None when it cannot be a valid key."""
    if not (MIN_FOREIGN_KEY_CHARS <= len(token) <= MAX_TOKEN_CHARS) or not _PRINTABLE.match(token):
        return None
    match = _TOKEN.match(token)
    if match:
        return match.group(1)
    if token.startswith(TOKEN_SCHEME):
        return None  # looks like ours but is malformed
    return _DERIVED + hash_token(token)[:16]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def same_hash(stored: str, token: str) -> bool:
    return hmac.compare_digest(stored.encode("ascii"), hash_token(token).encode("ascii"))


def parse_scopes(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Scopes from CLI values (repeated or comma-separated).

    Raises:
        InvalidRequest: an unknown scope.
    """
    scopes = sorted(
        {s.strip() for v in (values or DEFAULT_SCOPES) for s in v.split(",") if s.strip()}
    )
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise InvalidRequest(f"unknown scope(s) {unknown}; known: {', '.join(sorted(SCOPES))}")
    return tuple(scopes)


@dataclass(frozen=True)
class TokenInfo:
    """A token's row joined with its tenant and quota, as the Gateway needs it."""

    token_id: int
    tenant_id: int
    tenant: str
    secret_hash: str
    scopes: frozenset[str]
    allowed_models: frozenset[str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    limits: tuple[int | None, int | None, int | None, int | None]
    suspended: bool = False  # the tenant is suspended: its tokens are refused (403)


def find_token(conn: Connection, prefix: str) -> TokenInfo | None:
    """One round trip: the token with ``prefix``, its tenant and its limits."""
    row = conn.execute(
        select(
            ApiToken.id,
            ApiToken.tenant_id,
            Tenant.name,
            ApiToken.secret_hash,
            ApiToken.scopes,
            ApiToken.allowed_models,
            ApiToken.expires_at,
            ApiToken.revoked_at,
            Quota.requests_per_minute,
            Quota.tokens_per_minute,
            Quota.tokens_per_day,
            Quota.max_concurrent,
            Tenant.suspended_at,
        )
        .join(Tenant, Tenant.id == ApiToken.tenant_id)
        .outerjoin(Quota, Quota.tenant_id == ApiToken.tenant_id)
        .where(ApiToken.prefix == prefix)
    ).one_or_none()
    if row is None:
        return None
    return TokenInfo(
        token_id=row[0],
        tenant_id=row[1],
        tenant=row[2],
        secret_hash=row[3],
        scopes=frozenset(row[4].split()),
        allowed_models=frozenset(row[5]) if row[5] is not None else None,
        expires_at=row[6],
        revoked_at=row[7],
        limits=(row[8], row[9], row[10], row[11]),
        suspended=row[12] is not None,
    )


class TokenRepository:
    """Creating, listing and revoking tokens (CLI and bootstrap)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(
        self,
        tenant: Tenant,
        *,
        scopes: tuple[str, ...] = DEFAULT_SCOPES,
        allowed_models: list[str] | None = None,
        expires_in_s: float | None = None,
        name: str | None = None,
        token: str | None = None,
    ) -> tuple[ApiToken, str]:
        """A new token for ``tenant``; the plaintext is returned once and never stored.

        ``token`` registers a given plaintext (the development key) instead of a new one.
        """
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise InvalidRequest(f"a token name is at most {MAX_NAME_CHARS} characters")
        if expires_in_s is not None and not 0 < expires_in_s <= MAX_EXPIRES_IN_S:
            raise InvalidRequest(f"expires-in must be between 1 and {MAX_EXPIRES_IN_S} seconds")
        if token is None:
            token, prefix = new_token()
        else:
            found = lookup_prefix(token)
            if found is None:
                raise InvalidRequest(
                    "the key is not a valid API key (16-512 printable ASCII characters)"
                )
            prefix = found
        now = datetime.now(UTC)
        row = ApiToken(
            tenant_id=tenant.id,
            prefix=prefix,
            secret_hash=hash_token(token),
            name=name,
            scopes=" ".join(parse_scopes(list(scopes))),
            allowed_models=sorted(set(allowed_models)) if allowed_models else None,
            created_at=now,
            expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s is not None else None,
        )
        self.session.add(row)
        self.session.flush()
        return row, token

    def by_token(self, token: str) -> ApiToken | None:
        prefix = lookup_prefix(token)
        if prefix is None:
            return None
        row = self.session.scalars(select(ApiToken).where(ApiToken.prefix == prefix)).one_or_none()
        return row if row is not None and same_hash(row.secret_hash, token) else None

    def list(self, tenant: Tenant | None = None) -> list[tuple[ApiToken, str]]:
        stmt = select(ApiToken, Tenant.name).join(Tenant, Tenant.id == ApiToken.tenant_id)
        if tenant is not None:
            stmt = stmt.where(ApiToken.tenant_id == tenant.id)
        return [(t, n) for t, n in self.session.execute(stmt.order_by(ApiToken.id)).all()]

    def revoke(self, id_or_token: str) -> ApiToken:
        """Revoke by numeric id, by prefix, or by the token itself.

        Raises:
            NotFound: nothing matches.
        """
        row = self.find(id_or_token)
        if row is None:
            raise NotFound("no such token")
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
        return row

    def find(self, id_or_token: str, *, secret_ok: bool = True) -> ApiToken | None:
        """The token of a numeric id, a prefix, or (``secret_ok``) the token itself."""
        row: ApiToken | None = None
        if id_or_token.isdigit() and len(id_or_token) <= 12:
            row = self.session.get(ApiToken, int(id_or_token))
        if row is None and secret_ok:
            row = self.by_token(id_or_token)
        if row is None:
            row = self.session.scalars(
                select(ApiToken).where(ApiToken.prefix == id_or_token)
            ).one_or_none()
        return row
