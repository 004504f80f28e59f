"""OIDC: a JWT access token of a trusted issuer (``auth.oidc``) → Principal.

One request's token goes through fixed steps, each of which refuses or passes on:

1. size and shape (at most ``MAX_TOKEN_CHARS``; three base64url segments);
2. the issuer: the unverified ``iss`` picks one configured issuer, nothing else is read
   before the signature is checked;
3. the header: ``alg`` in the issuer's allowlist (asymmetric only), a ``kid``;
4. the key: the issuer's JWKS (``_KeySet``), found through its discovery document;
5. PyJWT verifies the signature and the claims: ``iss`` exact, ``aud`` required and equal,
   ``exp`` and ``sub`` required, ``nbf``/``iat`` within ``leeway_s``;
6. the principal: tenant from ``tenant_claim`` (403 without it), HAIF scopes through
   ``scope_map``, models narrowed by ``models_claim``, the tenant's row from the store.

Every refusal in steps 1-5 raises the same ``AuthenticationFailed`` as a bad API key, so a
caller learns nothing about which part of its token was wrong; the reason is one INFO log
line. A tenant problem (step 6) is a 403 that names the tenant.

The key set is cached ``jwks_cache_s``; a ``kid`` it does not hold refetches it at most once
per ``refetch_cooldown_s`` (concurrent misses share one fetch), so a flood of random kids
costs a bounded number of fetches, and a key rotated at the issuer is picked up without a
restart. An unreachable issuer: its last good keys serve until ``max_stale_s`` after their
last successful fetch, then its tokens get ``IdentityProviderUnavailable`` (503), never an
unverified pass.

With ``cache_s`` (the Gateway passes ``auth.token_cache_ttl_s``) a verified token's
principal is kept, at most until its ``exp``, so a bearer sending one JWT on every request
pays the checks once; the auth epoch (a suspension, a quota change) drops them all. A
key retired at the issuer stops verifying new tokens at once and tokens already verified
with it within ``cache_s``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import httpx
import jwt

from haif.envelope import Principal
from haif.exceptions import AuthenticationFailed, IdentityProviderUnavailable, PermissionDenied
from haif.gateway.auth import AUTH_FAILED_MESSAGE, MISS, TtlCache

if TYPE_CHECKING:
    from collections.abc import Callable

    from haif.config.server import OidcIssuer
    from haif.store.quotas import QuotaLimits

logger = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 8 * 1024
# A discovery document or a JWKS larger than this is refused (a real one is a few KiB).
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_KEYS = 64
DISCOVERY_PATH = "/.well-known/openid-configuration"
_SIGNING_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})


class TenantRecord(NamedTuple):
    tenant_id: int
    limits: QuotaLimits
    suspended: bool


class TenantLookup(Protocol):
    async def __call__(self, name: str, create: bool) -> TenantRecord | None:
        """The tenant called ``name``; created with the default quotas when ``create`` and
        it does not exist; None when it does not exist (and ``create`` is false)."""
        ...


class _FetchError(Exception):
    """The issuer's discovery document or key set could not be fetched or read."""


def _b64_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has a JWS's shape: three base64url segments, the first a JSON
    object with ``alg``. Says nothing about whether it is valid."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        return False
    header = token.split(".", 1)[0]
    try:
        decoded = _b64_json(header)
    except (ValueError, UnicodeError, binascii.Error):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _refuse(reason: str, *args: object) -> AuthenticationFailed:
    logger.info("OIDC token refused: " + reason, *args)
    return AuthenticationFailed(AUTH_FAILED_MESSAGE)


def _secure_url(url: Any, issuer: str) -> bool:
    """https, or http where the issuer itself is a (loopback) http one."""
    if not isinstance(url, str):
        return False
    scheme = urlsplit(url).scheme
    return scheme == "https" or (scheme == "http" and urlsplit(issuer).scheme == "http")


async def _get_json(client: httpx.AsyncClient, url: str) -> Any:
    try:
        async with client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise _FetchError(f"{url} answered {resp.status_code}")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise _FetchError(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
    try:
        return json.loads(bytes(body))
    except ValueError as exc:
        raise _FetchError(f"{url} is not JSON") from exc


def _signing_keys(document: Any) -> dict[str, dict[str, Any]]:
    """The JWKS's signature keys by kid (keys without a kid, or for encryption, are left out)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("the key set has no `keys` list")
    keys: dict[str, dict[str, Any]] = {}
    for jwk in document["keys"][:MAX_KEYS]:
        if (
            isinstance(jwk, dict)
            and isinstance(jwk.get("kid"), str)
            and jwk.get("kty") in _SIGNING_KEY_TYPES
            and jwk.get("use", "sig") == "sig"
        ):
            keys[jwk["kid"]] = jwk
    return keys


class _KeySet:
    """One issuer's signing keys: fetched, cached, refreshed, served stale for a bounded time."""

    def __init__(self, config: OidcIssuer, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._parsed: dict[tuple[str, str], jwt.PyJWK] = {}
        self._jwks_uri: str | None = None
        self._fetched_at: float | None = None  # the last successful fetch
        self._attempted_at: float | None = None  # the last fetch, successful or not
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._config.jwks_cache_s

    def usable_until(self) -> float:
        """When the keys last fetched stop being usable (the stale bound); -inf: none."""
        if self._fetched_at is None:
            return float("-inf")
        return self._fetched_at + max(self._config.jwks_cache_s, self._config.max_stale_s)

    def _usable(self, now: float) -> bool:
        if self._fetched_at is None:
            return False
        age = now - self._fetched_at
        return age < self._config.jwks_cache_s or age <= self._config.max_stale_s

    async def key(self, kid: str, alg: str) -> jwt.PyJWK:
        """The key ``kid`` for ``alg``.

        Raises:
            AuthenticationFailed: no such key (after a refetch, where the cooldown allows one),
                or it is not a key for ``alg``.
            IdentityProviderUnavailable: no usable key set (never fetched, or too stale).
        """
        if not self._fresh(self._clock()):
            await self._refresh()
        if kid not in self._keys and self._usable(self._clock()):
            await self._refresh()
        if not self._usable(self._clock()):
            raise IdentityProviderUnavailable(
                f"the keys of identity provider {self._config.issuer} cannot be fetched"
            )
        jwk = self._keys.get(kid)
        if jwk is None:
            raise _refuse("issuer %s has no key %r", self._config.issuer, kid[:64])
        if jwk.get("alg", alg) != alg:
            raise _refuse("key %r of %s is for %s, not %s", kid[:64], self._config.issuer, jwk["alg"], alg)
        parsed = self._parsed.get((kid, alg))
        if parsed is None:
            try:
                parsed = jwt.PyJWK(jwk, algorithm=alg)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise _refuse("key %r of %s is unusable for %s: %s", kid[:64], self._config.issuer, alg, exc) from None
            self._parsed[(kid, alg)] = parsed
        return parsed

    async def _refresh(self) -> None:
        """Fetch the keys, unless a fetch is under way (then wait for it) or the last one
        began less than ``refetch_cooldown_s`` ago (then do nothing)."""
        if self._inflight is None:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._config.refetch_cooldown_s:
                return
            self._attempted_at = now
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._fetch_done)
        # Shielded: one caller's cancellation (a client gone) does not cancel the others' fetch.
        await asyncio.shield(self._inflight)

    def _fetch_done(self, _task: asyncio.Task[None]) -> None:
        self._inflight = None

    async def _fetch(self) -> None:
        self.fetches += 1
        issuer = self._config.issuer
        try:
            async with httpx.AsyncClient(
                timeout=self._config.fetch_timeout_s, follow_redirects=False
            ) as client:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover(client)
                keys = _signing_keys(await _get_json(client, self._jwks_uri))
        except _FetchError as exc:
            self._jwks_uri = None  # discover again next time: the document may have moved
            logger.warning("cannot fetch the keys of identity provider %s: %s", issuer, exc)
            return
        self._keys = keys
        self._parsed = {}
        self._fetched_at = self._clock()

    async def _discover(self, client: httpx.AsyncClient) -> str:
        issuer = self._config.issuer
        document = await _get_json(client, issuer.rstrip("/") + DISCOVERY_PATH)
        if not isinstance(document, dict) or document.get("issuer") != issuer:
            raise _FetchError("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not _secure_url(jwks_uri, issuer):
            raise _FetchError(f"the discovery document's jwks_uri is unusable: {jwks_uri!r}")
        return jwks_uri


def _scope_values(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


class OidcAuthenticator:
    """JWT access tokens of the configured issuers → Principal (see the module docstring)."""

    def __init__(
        self,
        issuers: list[OidcIssuer],
        tenants: TenantLookup,
        clock: Callable[[], float] = time.monotonic,
        cache_s: float = 0.0,
        max_entries: int = 10_000,
    ) -> None:
        self._issuers = {config.issuer: config for config in issuers}
        self._keysets = {config.issuer: _KeySet(config, clock) for config in issuers}
        self._tenants = tenants
        # Verified tokens → (their exp, principal), for ``cache_s`` (at most until the token's
        # ``exp``): a bearer sending one JWT on every request pays its checks once. Dropped
        # whole when the auth epoch moves (``forget``): a suspension or a quota change applies
        # at once.
        self._cache_s = cache_s
        self._verified: TtlCache[tuple[float, Principal]] = TtlCache(cache_s, max_entries, clock)

    def forget(self) -> None:
        self._verified.forget()

    @property
    def fetches(self) -> int:
        """Fetches of issuers' key sets so far (each one a discovery and/or a JWKS request)."""
        return sum(keyset.fetches for keyset in self._keysets.values())

    async def authenticate(self, token: str) -> Principal:
        """The principal ``token`` acts for.

        Raises:
            AuthenticationFailed: the token is not a valid one of a configured issuer.
            PermissionDenied: it names no tenant, or one HAIF does not know or has suspended.
            IdentityProviderUnavailable: the issuer's keys cannot be had.
        """
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest() if self._cache_s > 0 else ""
        hit = self._verified.get(digest) if digest else MISS
        if hit is not MISS and hit[0] > time.time():
            return hit[1]
        generation = self._verified.generation
        principal, expires_at = await self._verify(token)
        if digest:
            # Never past the issuer's stale bound: its keys unusable, its tokens get the 503.
            until = self._keysets[principal.issuer].usable_until()
            self._verified.put(digest, (expires_at, principal), generation, until)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of a token not seen (or no longer cached), and its ``exp``."""
        config, header = self._issuer_of(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in config.algorithms:
            raise _refuse("algorithm %r is not allowed for %s", str(alg)[:16], config.issuer)
        if not isinstance(kid, str) or not kid:
            raise _refuse("token of %s names no kid", config.issuer)
        key = await self._keysets[config.issuer].key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(config.algorithms),
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise _refuse("token of %s: %s", config.issuer, exc) from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise _refuse("token of %s has an empty sub", config.issuer)
        return await self._principal(config, claims), float(claims["exp"])

    def _issuer_of(self, token: str) -> tuple[OidcIssuer, dict[str, Any]]:
        """The configured issuer the unverified ``iss`` names, and the token's header."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise _refuse("token longer than %d characters", MAX_TOKEN_CHARS)
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _refuse("malformed token: %s", exc) from None
        issuer = claims.get("iss")
        config = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if config is None:
            raise _refuse("issuer %r is not in auth.oidc", str(issuer)[:200])
        return config, header

    async def _principal(self, config: OidcIssuer, claims: dict[str, Any]) -> Principal:
        tenant = claims.get(config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise PermissionDenied(f"the token names no tenant (claim {config.tenant_claim!r})")
        record = await self._tenants(tenant, config.create_tenants)
        if record is None:
            raise PermissionDenied(f"tenant {tenant} is not known to HAIF")
        if record.suspended:
            raise PermissionDenied(f"tenant {tenant} is suspended")
        scopes = frozenset(
            config.scope_map[value]
            for value in _scope_values(claims.get(config.scopes_claim))
            if value in config.scope_map
        )
        return Principal(
            tenant=tenant,
            scopes=scopes,
            allowed_models=self._models(config, claims),
            tenant_id=record.tenant_id,
            limits=record.limits,
            issuer=config.issuer,
            subject=claims["sub"],
        )

    @staticmethod
    def _models(config: OidcIssuer, claims: dict[str, Any]) -> frozenset[str] | None:
        if config.models_claim is None or config.models_claim not in claims:
            return None
        # A claim of another shape narrows to nothing: fail closed.
        return frozenset(_scope_values(claims[config.models_claim]))
