"""Authentication: API key → Principal.

``DatabaseAuthenticator`` finds tokens in the metadata store and caches each answer
(good or bad) for ``auth.token_cache_ttl_s``, and a burst of requests with one token
costs one lookup. A revoked token or a suspended tenant does not wait out the cache: each
such change bumps the auth epoch (a row of ``auth_changes``), the routing table carries
the epoch to every Gateway replica, and a replica that sees a new epoch drops its cached
answers (:meth:`DatabaseAuthenticator.forget`); the TTL bounds the rest (a changed quota). The cache is
keyed by the token's hash, never the token. ``StaticKeyAuthenticator`` accepts the
development key alone (``auth.backend: static``, no tenancy).

Every failure raises the same ``AuthenticationFailed`` with the same message, so a
caller learns nothing about which part of its credential was wrong.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from haif.envelope import Principal
from haif.exceptions import AuthenticationFailed, PermissionDenied

if TYPE_CHECKING:
    from collections.abc import Callable

    from haif.store.db import Database
    from haif.store.tokens import TokenInfo

logger = logging.getLogger("haif.gateway")
V = TypeVar("V")

AUTH_FAILED_MESSAGE = "invalid or missing API key"
MAX_KEY_CHARS = 512
# Compared against when no row matches, so that unknown prefixes cost the same work.
_DUMMY_HASH = "0" * 64


class Authenticator(Protocol):
    async def authenticate(self, api_key: str | None) -> Principal:
        """Return who ``api_key`` belongs to.

        Raises:
            AuthenticationFailed: the key is missing, unknown, expired or revoked.
        """
        ...


def _refuse() -> AuthenticationFailed:
    return AuthenticationFailed(AUTH_FAILED_MESSAGE)


def suspended(tenant: str) -> PermissionDenied:
    return PermissionDenied(f"tenant {tenant!r} is suspended")


class StaticKeyAuthenticator:
    """Accepts exactly one key (the development key of the config), compared in constant time."""

    def __init__(self, api_key: str, tenant: str) -> None:
        self._key = api_key.encode("utf-8")
        self._principal = Principal(tenant=tenant, scopes=frozenset({"inference", "admin"}))

    async def authenticate(self, api_key: str | None) -> Principal:
        if not api_key or len(api_key) > MAX_KEY_CHARS:
            raise _refuse()
        if not hmac.compare_digest(api_key.encode("utf-8", "surrogateescape"), self._key):
            raise _refuse()
        return self._principal


MISS: Any = object()  # TtlCache.get: nothing fresh under that key


class TtlCache(Generic[V]):
    """A replica's cached credential answers: each kept ``ttl_s`` (or less, ``until``), at
    most ``max_entries`` (the oldest stored goes first). ``forget`` drops them all and makes
    every store begun before it (``generation``) a no-op, so a lookup that read the old row
    cannot put it back. Every credential cache of the Gateway is one of these."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.generation = 0

    def get(self, key: str) -> V:
        """The fresh value under ``key``, else ``MISS``."""
        item = self._items.get(key)
        if item is None or item[0] <= self._clock():
            return MISS
        return item[1]

    def put(self, key: str, value: V, generation: int, until: float | None = None) -> None:
        """Keep ``value``, unless ``forget`` came since ``generation`` was read (or ttl is 0);
        ``until``: a clock time it must not outlive."""
        if self._ttl_s <= 0 or generation != self.generation:
            return
        fresh_until = self._clock() + self._ttl_s
        self._items[key] = (fresh_until if until is None else min(fresh_until, until), value)
        self._items.move_to_end(key)
        while len(self._items) > self._max_entries:
            self._items.popitem(last=False)

    def forget(self) -> None:
        self.generation += 1
        self._items.clear()


@dataclass(frozen=True)
class _Entry:
    principal: Principal | None  # None: refused
    expires_at: float | None  # the token's own expiry, wall clock
    suspended: bool = False  # the principal's tenant is suspended (403, not 401)


def principal_of(
    info: TokenInfo | None, token: str, now: datetime
) -> tuple[Principal | None, float | None]:
    """The principal ``token`` authenticates as, or None; and the token's expiry (epoch s)."""
    from haif.store.quotas import QuotaLimits
    from haif.store.tokens import same_hash

    if info is None:
        same_hash(_DUMMY_HASH, token)
        return None, None
    if not same_hash(info.secret_hash, token):
        return None, None
    if info.revoked_at is not None or (info.expires_at is not None and info.expires_at <= now):
        return None, None
    principal = Principal(
        tenant=info.tenant,
        scopes=info.scopes,
        allowed_models=info.allowed_models,
        tenant_id=info.tenant_id,
        token_id=info.token_id,
        limits=QuotaLimits(*info.limits),
    )
    return principal, info.expires_at.timestamp() if info.expires_at is not None else None


class DatabaseAuthenticator:
    """Tokens from the metadata store behind a bounded TTL cache; one lookup per key in flight."""

    def __init__(
        self,
        db: Database,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._cache: TtlCache[_Entry] = TtlCache(ttl_s, max_entries, clock)
        self._pending: dict[str, asyncio.Future[_Entry]] = {}
        self.lookups = 0  # database round trips, for tests and metrics

    async def authenticate(self, api_key: str | None) -> Principal:
        from haif.store.tokens import hash_token, lookup_prefix

        if not api_key:
            raise _refuse()
        prefix = lookup_prefix(api_key)
        if prefix is None:  # malformed: refused without a lookup
            raise _refuse()
        digest = hash_token(api_key)
        entry = self._cache.get(digest)
        if entry is MISS:
            entry = await self._lookup(digest, prefix, api_key)
        if entry.principal is None or (
            entry.expires_at is not None and entry.expires_at <= time.time()
        ):
            raise _refuse()
        if entry.suspended:
            raise suspended(entry.principal.tenant)
        return entry.principal

    def forget(self) -> None:
        """Drop every cached answer (an auth change: the next request of each key looks it up)."""
        self._cache.forget()
        self._pending.clear()  # a lookup in flight may have read the old row

    async def _lookup(self, digest: str, prefix: str, api_key: str) -> _Entry:
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        generation = self._cache.generation
        try:
            info = await self._db.run(_find, self._db, prefix)
            self.lookups += 1
            principal, expires_at = principal_of(info, api_key, datetime.now(UTC))
            entry = _Entry(principal, expires_at, info is not None and info.suspended)
            self._cache.put(digest, entry, generation)
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            if self._pending.get(digest) is future:
                del self._pending[digest]


def _find(db: Database, prefix: str) -> TokenInfo | None:
    from haif.store.tokens import find_token

    with db.connect() as conn:
        return find_token(conn, prefix)


class Forgetful(Protocol):
    def forget(self) -> None: ...


class CredentialCaches:
    """A Gateway replica's cached credentials (tokens, peers, JWT tenants), dropped together
    when the auth epoch the routing table carries moves (``haif.admin.audit.auth_changed``)."""

    def __init__(self, *caches: Forgetful | None) -> None:
        self._caches = [c for c in caches if c is not None]
        self.epoch: int | None = None

    def add(self, cache: Forgetful) -> None:
        self._caches.append(cache)

    def observe(self, epoch: int) -> None:
        if epoch != self.epoch:
            if self.epoch is not None:
                logger.info("auth epoch %d: cached credentials dropped", epoch)
            self.epoch = epoch
            self.forget()

    def forget(self) -> None:
        for cache in self._caches:
            cache.forget()


PEER_REFUSED_MESSAGE = "this peer's public key is not mapped to a tenant (haif p2p peers add)"


class PeerAuthenticator:
    """A P2P caller's Noise public key (verified by the shim's handshake) → Principal.

    Keys come from ``p2p.peers`` in the config (tenant by name) and from the metadata
    store's ``p2p_peers`` rows (``haif p2p peers add``), the latter cached like tokens for
    ``auth.token_cache_ttl_s``, refusals included: a removed peer stops working within it.
    """

    def __init__(
        self,
        config_peers: dict[str, str],
        db: Database | None,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config_peers = {k.lower(): tenant for k, tenant in config_peers.items()}
        self._db = db
        self._cache: TtlCache[_Entry] = TtlCache(ttl_s, max_entries, clock)
        self.lookups = 0

    def forget(self) -> None:
        """Drop every cached answer (a peer removed, a tenant suspended: see the auth epoch)."""
        self._cache.forget()

    async def authenticate(self, peer_key: str) -> Principal:
        key = peer_key.strip().lower()
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise AuthenticationFailed(PEER_REFUSED_MESSAGE)
        entry = self._cache.get(key)
        if entry is MISS:
            generation = self._cache.generation
            principal, is_suspended = await self._find(key)
            entry = _Entry(principal, None, is_suspended)
            self._cache.put(key, entry, generation)
        if entry.principal is None:
            raise AuthenticationFailed(PEER_REFUSED_MESSAGE)
        if entry.suspended:
            raise suspended(entry.principal.tenant)
        return entry.principal

    async def _find(self, key: str) -> tuple[Principal | None, bool]:
        from haif.store.quotas import QuotaLimits

        if self._db is not None:
            info = await self._db.run(_find_peer, self._db, key)
            self.lookups += 1
            if info is not None:
                principal = Principal(tenant=info.tenant, tenant_id=info.tenant_id, limits=QuotaLimits(*info.limits))
                return principal, info.suspended
        tenant = self._config_peers.get(key)
        if tenant is None:
            return None, False
        if self._db is None:
            return Principal(tenant=tenant), False  # no metadata store: no quotas to apply
        found = await self._db.run(find_tenant, self._db, tenant)
        if found is None:
            return None, False  # p2p.peers names a tenant the store does not have
        tenant_id, limits, is_suspended = found
        return Principal(tenant=tenant, tenant_id=tenant_id, limits=QuotaLimits(*limits)), is_suspended


def _find_peer(db: Database, key: str):  # noqa: ANN202
    from haif.store.peers import find_peer

    with db.connect() as conn:
        return find_peer(conn, key)


def find_tenant(db: Database, name: str) -> tuple[int, tuple[int | None, ...], bool] | None:
    from sqlalchemy import select

    from haif.store.models import Quota, Tenant

    with db.connect() as conn:
        row = conn.execute(
            select(Tenant.id, Quota.requests_per_minute, Quota.tokens_per_minute, Quota.tokens_per_day,
                   Quota.max_concurrent, Tenant.suspended_at)
            .outerjoin(Quota, Quota.tenant_id == Tenant.id)
            .where(Tenant.name == name)
        ).one_or_none()
    return None if row is None else (row[0], tuple(row[1:5]), row[5] is not None)

