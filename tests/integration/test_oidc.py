"""OidcAuthenticator against a real OpenID provider (oidc-provider on loopback, no Ray).

The provider issues access tokens by client credentials; the tests also hold its private
keys (tests/support/oidc_provider.py) to forge the tokens no provider would issue. The
authenticator's clock is injected where a test needs time to pass (cache, cooldown,
staleness), so nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from haif.config.server import OidcIssuer
from haif.exceptions import AuthenticationFailed, IdentityProviderUnavailable, PermissionDenied
from haif.gateway.auth import AUTH_FAILED_MESSAGE, StaticKeyAuthenticator
from haif.gateway.oidc import OidcAuthenticator, TenantRecord
from haif.store.quotas import QuotaLimits
from tests.support.oidc_provider import OidcProvider, SigningKey, new_keyset

pytestmark = pytest.mark.integration

AUDIENCE = "https://haif.test/api"
ACME_LIMITS = QuotaLimits(requests_per_minute=60, max_concurrent=4)


class Tenants:
    """An in-memory TenantLookup: acme and globex, frozen suspended."""

    def __init__(self) -> None:
        self.rows = {
            "acme": TenantRecord(1, ACME_LIMITS, False),
            "globex": TenantRecord(2, QuotaLimits(), False),
            "frozen": TenantRecord(3, QuotaLimits(), True),
        }
        self.created: list[str] = []

    async def __call__(self, name: str, create: bool) -> TenantRecord | None:
        if name not in self.rows and create:
            self.rows[name] = TenantRecord(100 + len(self.created), QuotaLimits(), False)
            self.created.append(name)
        return self.rows.get(name)


class CountingTenants(Tenants):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def __call__(self, name: str, create: bool) -> TenantRecord | None:
        self.calls += 1
        return await super().__call__(name, create)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """One provider for the tests that do not stop or rotate it."""
    server = OidcProvider(tmp_path_factory.mktemp("oidc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_provider(tmp_path: Path) -> Iterator[OidcProvider]:
    """A provider of the test's own, to stop or rotate."""
    server = OidcProvider(tmp_path)
    server.start()
    yield server
    server.stop()


def issuer_of(server: OidcProvider, **overrides: Any) -> OidcIssuer:
    return OidcIssuer(issuer=server.issuer, audience=AUDIENCE, tenant_claim="haif_tenant", **overrides)


def authenticator(
    server: OidcProvider, tenants: Tenants | None = None, clock: Clock | None = None, **overrides: Any
) -> OidcAuthenticator:
    return OidcAuthenticator([issuer_of(server, **overrides)], tenants or Tenants(), clock or time.monotonic)


def claims(server: OidcProvider, **changes: Any) -> dict[str, Any]:
    """The claims of a good token; a change to None drops the claim."""
    now = int(time.time())
    out = {
        "iss": server.issuer, "aud": AUDIENCE, "sub": "svc-1", "iat": now, "exp": now + 300,
        "haif_tenant": "acme", "scope": "haif:inference",
    }
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HS256 JWT by hand (PyJWT rightly refuses a PEM as an HMAC secret)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def unsigned(payload: dict[str, Any], kid: str) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(payload).encode())}."


def tampered(token: str) -> str:
    head, body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["haif_tenant"] = "globex"
    return f"{head}.{_b64(json.dumps(payload).encode())}.{sig}"


async def api_key_refusal_body() -> dict[str, Any]:
    try:
        await StaticKeyAuthenticator("k" * 32, "default").authenticate("wrong")
    except AuthenticationFailed as exc:
        return exc.to_body()
    raise AssertionError("a wrong API key was accepted")


async def test_a_token_the_provider_issued_is_accepted(provider: OidcProvider) -> None:
    auth = authenticator(provider)
    token = provider.token("tenant-a", AUDIENCE, "haif:inference haif:admin")
    principal = await auth.authenticate(token)
    assert principal.tenant == "acme"
    assert principal.scopes == frozenset({"inference", "admin"})
    assert principal.tenant_id == 1
    assert principal.limits == ACME_LIMITS
    assert principal.allowed_models is None
    assert (principal.issuer, principal.subject) == (provider.issuer, "tenant-a")
    assert principal.caller == f"oidc:{provider.issuer}#tenant-a"
    # The keys are cached: a second token costs no fetch.
    other = provider.token("tenant-b", AUDIENCE, "haif:tenant_admin")
    assert (await auth.authenticate(other)).scopes == frozenset({"tenant_admin"})
    assert auth.fetches == 1


async def test_scopes_are_mapped_and_models_narrowed(provider: OidcProvider) -> None:
    auth = authenticator(provider, models_claim="haif_models")
    key = provider.keys[0]
    token = key.sign(claims(provider, scope="openid haif:inference other", haif_models=["tiny", "echo"]))
    principal = await auth.authenticate(token)
    assert principal.scopes == frozenset({"inference"})
    assert principal.allowed_models == frozenset({"tiny", "echo"})
    listed = key.sign(claims(provider, scope=["haif:admin", "x"], haif_models="tiny"))
    principal = await auth.authenticate(listed)
    assert (principal.scopes, principal.allowed_models) == (frozenset({"admin"}), frozenset({"tiny"}))
    # No scope HAIF knows: a principal without scopes (the Gateway refuses it inference).
    assert (await auth.authenticate(key.sign(claims(provider, scope="openid")))).scopes == frozenset()


async def test_each_allowed_algorithm_verifies(provider: OidcProvider) -> None:
    auth = authenticator(provider)  # the default allowlist: RS256, ES256, PS256, EdDSA
    rsa_key, ec_key = provider.keys
    for token in (rsa_key.sign(claims(provider), alg="PS256"), ec_key.sign(claims(provider))):
        assert (await auth.authenticate(token)).tenant == "acme"
    # A key is used for its own family only: an RSA kid under ES256 is refused.
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(ec_key.sign(claims(provider), kid=rsa_key.kid))


def _forged(server: OidcProvider, case: str) -> str:
    rsa_key, ec_key = server.keys
    now = int(time.time())
    good = rsa_key.sign(claims(server))
    stranger = new_keyset()[0]
    cases = {
        "expired": lambda: rsa_key.sign(claims(server, iat=now - 7200, exp=now - 3600)),
        "no exp": lambda: rsa_key.sign(claims(server, exp=None)),
        "nbf in the future": lambda: rsa_key.sign(claims(server, nbf=now + 3600)),
        "iat in the future": lambda: rsa_key.sign(claims(server, iat=now + 3600, exp=now + 7200)),
        "wrong audience": lambda: rsa_key.sign(claims(server, aud="https://other.test/api")),
        "no audience": lambda: rsa_key.sign(claims(server, aud=None)),
        "no sub": lambda: rsa_key.sign(claims(server, sub=None)),
        "wrong issuer": lambda: rsa_key.sign(claims(server, iss=server.issuer + "/")),
        "issuer not in the config": lambda: stranger.sign(claims(server, iss="https://idp.example")),
        "alg none": lambda: unsigned(claims(server), rsa_key.kid),
        "HS256 with the public key": lambda: hs256(claims(server), rsa_key.public_pem(), rsa_key.kid),
        "PS256 outside the allowlist": lambda: rsa_key.sign(claims(server), alg="PS256"),
        "ES256 outside the allowlist": lambda: ec_key.sign(claims(server)),
        "tampered payload": lambda: tampered(good),
        "signed by another key under a known kid": lambda: stranger.sign(claims(server), kid=rsa_key.kid),
        "unknown kid": lambda: rsa_key.sign(claims(server), kid="no-such-kid"),
        "malformed": lambda: "not.a.jwt",
        "longer than 8 KiB": lambda: rsa_key.sign(claims(server, pad="x" * 9000)),
    }
    return cases[case]()


REFUSED = [
    "expired", "no exp", "nbf in the future", "iat in the future", "wrong audience", "no audience",
    "no sub", "wrong issuer", "issuer not in the config", "alg none", "HS256 with the public key",
    "PS256 outside the allowlist", "ES256 outside the allowlist", "tampered payload",
    "signed by another key under a known kid", "unknown kid", "malformed", "longer than 8 KiB",
]


async def test_every_bad_token_gets_the_same_401_as_a_bad_api_key(
    provider: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await api_key_refusal_body()
    auth = authenticator(provider, algorithms=["RS256"])
    # The good token of the same forger passes: the refusals below are the claims' doing.
    assert (await auth.authenticate(provider.keys[0].sign(claims(provider)))).tenant == "acme"
    for case in REFUSED:
        token = _forged(provider, case)
        with pytest.raises(AuthenticationFailed) as refused:
            await auth.authenticate(token)
        assert refused.value.status_code == 401, case
        assert refused.value.to_body() == expected, case
        assert refused.value.message == AUTH_FAILED_MESSAGE
    assert not [r for r in caplog.records if r.exc_info], "a refusal logged a traceback"


async def test_an_unknown_kid_refetches_once(provider: OidcProvider) -> None:
    clock = Clock()
    auth = authenticator(provider, clock=clock, refetch_cooldown_s=10)
    key = provider.keys[0]
    await auth.authenticate(key.sign(claims(provider)))
    assert auth.fetches == 1
    clock.advance(11)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(key.sign(claims(provider), kid="unknown-1"))
    assert auth.fetches == 2
    # Within the cooldown another unknown kid costs no fetch.
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(key.sign(claims(provider), kid="unknown-2"))
    assert auth.fetches == 2


async def test_a_flood_of_random_kids_makes_a_bounded_number_of_fetches(provider: OidcProvider) -> None:
    cooldown_s = 1.0
    auth = authenticator(provider, refetch_cooldown_s=cooldown_s)
    key = provider.keys[0]
    tokens = [key.sign(claims(provider), kid=f"random-{i}") for i in range(500)]
    started = time.monotonic()
    results = await asyncio.gather(*(auth.authenticate(t) for t in tokens), return_exceptions=True)
    elapsed = time.monotonic() - started
    assert all(isinstance(r, AuthenticationFailed) for r in results), {type(r) for r in results}
    assert 1 <= auth.fetches <= 1 + elapsed / cooldown_s + 1, (auth.fetches, elapsed)
    # The real key still works after the flood.
    assert (await auth.authenticate(key.sign(claims(provider)))).tenant == "acme"


async def test_a_token_without_the_tenant_claim_is_a_403(provider: OidcProvider) -> None:
    auth = authenticator(provider)
    with pytest.raises(PermissionDenied, match="names no tenant") as refused:
        await auth.authenticate(provider.token("no-tenant", AUDIENCE))
    assert refused.value.status_code == 403


async def test_a_verified_token_is_cached_until_the_auth_epoch_moves(provider: OidcProvider) -> None:
    """With cache_s, one bearer's checks and tenant lookup happen once; forget() (a new
    auth epoch: a suspension, a quota change) makes the next request check again."""
    tenants = CountingTenants()
    auth = OidcAuthenticator([issuer_of(provider)], tenants, cache_s=60)
    token = provider.token("tenant-a", AUDIENCE)
    first = await auth.authenticate(token)
    assert await auth.authenticate(token) is first and tenants.calls == 1
    tenants.rows["acme"] = tenants.rows["acme"]._replace(suspended=True)
    assert await auth.authenticate(token) is first  # cached ...
    auth.forget()  # ... until the routing table brings the new epoch
    with pytest.raises(PermissionDenied, match="suspended"):
        await auth.authenticate(token)
    with pytest.raises(AuthenticationFailed):  # refusals are never cached as a pass
        await auth.authenticate(tampered(token))


async def test_a_suspended_tenant_is_a_403(provider: OidcProvider) -> None:
    with pytest.raises(PermissionDenied, match="tenant frozen is suspended"):
        await authenticator(provider).authenticate(provider.token("suspended", AUDIENCE))


async def test_an_unknown_tenant_is_a_403_unless_the_issuer_creates_tenants(provider: OidcProvider) -> None:
    tenants = Tenants()
    with pytest.raises(PermissionDenied, match="tenant nobody is not known to HAIF"):
        await authenticator(provider, tenants).authenticate(provider.token("unknown", AUDIENCE))
    assert tenants.created == []
    creating = authenticator(provider, tenants, create_tenants=True)
    principal = await creating.authenticate(provider.token("unknown", AUDIENCE))
    assert (principal.tenant, principal.limits) == ("nobody", QuotaLimits())
    assert tenants.created == ["nobody"]


async def test_rotated_keys_are_picked_up_and_retired_ones_refused(own_provider: OidcProvider) -> None:
    clock = Clock()
    auth = authenticator(own_provider, clock=clock, refetch_cooldown_s=10, jwks_cache_s=300)
    old_token = own_provider.token("tenant-a", AUDIENCE)
    assert (await auth.authenticate(old_token)).tenant == "acme"
    old_key: SigningKey = own_provider.keys[0]

    own_provider.restart()  # a new keyset, the old one retired
    new_token = own_provider.token("tenant-a", AUDIENCE)
    assert jwt.get_unverified_header(new_token)["kid"] != old_key.kid
    clock.advance(11)  # past the cooldown: the new kid triggers a refetch
    assert (await auth.authenticate(new_token)).tenant == "acme"
    assert auth.fetches == 2
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(old_token)


async def test_a_retired_key_stops_working_when_the_cache_expires(own_provider: OidcProvider) -> None:
    clock = Clock()
    auth = authenticator(own_provider, clock=clock, jwks_cache_s=60)
    old_token = own_provider.token("tenant-a", AUDIENCE)
    await auth.authenticate(old_token)
    own_provider.restart()
    assert (await auth.authenticate(old_token)).tenant == "acme"  # still cached
    clock.advance(61)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(old_token)
    assert auth.fetches == 2


async def test_an_unreachable_issuer_is_served_stale_then_fails_closed(own_provider: OidcProvider) -> None:
    clock = Clock()
    knobs = {"jwks_cache_s": 5, "max_stale_s": 20, "refetch_cooldown_s": 1, "fetch_timeout_s": 2}
    auth = authenticator(own_provider, clock=clock, **knobs)
    token = own_provider.token("tenant-a", AUDIENCE)
    await auth.authenticate(token)
    keys = own_provider.keys
    own_provider.stop()

    clock.advance(6)  # the cache expired: a fetch fails, the last keys serve
    assert (await auth.authenticate(token)).tenant == "acme"
    assert auth.fetches == 2
    clock.advance(13)  # 19 s after the last good fetch
    assert (await auth.authenticate(token)).tenant == "acme"
    clock.advance(2)  # 21 s: too stale
    with pytest.raises(IdentityProviderUnavailable) as unavailable:
        await auth.authenticate(token)
    assert (unavailable.value.status_code, unavailable.value.code) == (503, "identity_provider_unavailable")

    # Never fetched and unreachable: 503 too, and the cooldown bounds the attempts.
    fresh = authenticator(own_provider, clock=clock, **knobs)
    for _ in range(3):
        with pytest.raises(IdentityProviderUnavailable):
            await fresh.authenticate(token)
    assert fresh.fetches == 1

    own_provider.start(keys)  # back, with the same keys: served again after the cooldown
    clock.advance(1)
    assert (await auth.authenticate(token)).tenant == "acme"
    assert (await fresh.authenticate(token)).tenant == "acme"
