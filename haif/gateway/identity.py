"""Who a bearer token names, HAIF key or JWT: the Gateway's authenticator of callers.

``CallerAuthenticator`` sends a JWT (``looks_like_jwt``) to the ``auth.oidc`` issuers'
authenticator (:mod:`haif.gateway.oidc`) and anything else to HAIF's API keys
(:mod:`haif.gateway.auth`). ``TenantDirectory`` gives the OIDC side its tenants from the
metadata store; like every credential cache it is dropped when the auth epoch moves.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from haif.gateway.auth import MISS, TtlCache, find_tenant
from haif.gateway.oidc import TenantRecord, looks_like_jwt

if TYPE_CHECKING:
    from collections.abc import Callable

    from haif.envelope import Principal
    from haif.gateway.auth import Authenticator
    from haif.gateway.oidc import OidcAuthenticator
    from haif.store.db import Database

logger = logging.getLogger("haif.gateway")


class TenantDirectory:
    """Tenants by name for JWT callers (``haif.gateway.oidc.TenantLookup``): id, limits and
    suspension from the metadata store, cached like tokens (answers and misses) and dropped
    with them when the auth epoch moves; ``create`` makes a missing tenant with unlimited
    quotas (an issuer with ``create_tenants``)."""

    def __init__(self, db: Database, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._cache: TtlCache[TenantRecord | None] = TtlCache(ttl_s, max_entries, clock)

    def forget(self) -> None:
        self._cache.forget()

    async def __call__(self, name: str, create: bool) -> TenantRecord | None:
        from haif.store.quotas import QuotaLimits

        hit = self._cache.get(name)
        if hit is not MISS and (hit is not None or not create):  # a cached miss may be created
            return hit
        generation = self._cache.generation
        found = await self._db.run(_find_or_create_tenant, self._db, name, create)
        record = None if found is None else TenantRecord(found[0], QuotaLimits(*found[1]), found[2])
        self._cache.put(name, record, generation)
        return record


def _find_or_create_tenant(db: Database, name: str, create: bool) -> tuple[int, tuple[int | None, ...], bool] | None:
    found = find_tenant(db, name)
    if found is not None or not create:
        return found
    from haif.exceptions import Conflict, InvalidRequest
    from haif.store.tenants import TenantRepository

    try:
        with db.session() as session:
            TenantRepository(session).create(name)
    except Conflict:
        pass  # another replica made it first
    except InvalidRequest:
        return None  # not a name HAIF can give a tenant
    else:
        logger.info("tenant %r created for its first JWT caller", name)
    return find_tenant(db, name)


class CallerAuthenticator:
    """A bearer token → Principal: a JWT of an issuer in ``auth.oidc`` goes to ``oidc``,
    anything else is a HAIF API key (``keys``)."""

    def __init__(self, keys: Authenticator, oidc: OidcAuthenticator | None) -> None:
        self._keys = keys
        self._oidc = oidc

    def forget(self) -> None:
        forget = getattr(self._keys, "forget", None)
        if forget is not None:
            forget()

    async def authenticate(self, api_key: str | None) -> Principal:
        if self._oidc is not None and api_key and looks_like_jwt(api_key):
            return await self._oidc.authenticate(api_key)
        return await self._keys.authenticate(api_key)

