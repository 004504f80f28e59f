"""auth.oidc without a provider: the config's rules, the JWT shape test, refusals that need
no key (the provider tests are tests/integration/test_oidc.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from haif.config import AuthConfig, OidcIssuer, load_config
from haif.exceptions import AuthenticationFailed
from haif.gateway.auth import AUTH_FAILED_MESSAGE
from haif.gateway.oidc import MAX_TOKEN_CHARS, OidcAuthenticator, TenantRecord, looks_like_jwt

pytestmark = pytest.mark.unit

ISSUER = "https://idp.example.com/realms/haif"


def issuer(**changes: object) -> OidcIssuer:
    return OidcIssuer.model_validate(
        {"issuer": ISSUER, "audience": "https://haif.example.com", "tenant_claim": "tenant", **changes}
    )


def segment(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def test_defaults() -> None:
    config = issuer()
    assert config.scopes_claim == "scope"
    assert config.scope_map == {
        "haif:inference": "inference", "haif:admin": "admin", "haif:tenant_admin": "tenant_admin",
    }
    assert config.models_claim is None
    assert config.create_tenants is False
    assert config.algorithms == ["RS256", "ES256", "PS256", "EdDSA"]
    assert (config.leeway_s, config.jwks_cache_s, config.refetch_cooldown_s) == (30, 300, 10)
    assert (config.max_stale_s, config.fetch_timeout_s) == (300, 5)
    assert AuthConfig().oidc == []


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000", "http://localhost:8080/realms/x", "http://[::1]:1234", ISSUER]
)
def test_https_or_a_loopback_http_issuer_is_accepted(url: str) -> None:
    assert issuer(issuer=url).issuer == url


@pytest.mark.parametrize(
    "url", ["http://idp.example.com", "http://10.0.0.5:8080", "ftp://idp.example.com", "idp.example.com",
            "https://idp.example.com/?x=1"]
)
def test_any_other_issuer_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        issuer(issuer=url)


@pytest.mark.parametrize("algorithms", [["none"], ["HS256"], ["RS256", "HS512"], ["XX256"], []])
def test_only_asymmetric_algorithms(algorithms: list[str]) -> None:
    with pytest.raises(ValidationError):
        issuer(algorithms=algorithms)


@pytest.mark.parametrize(
    "changes",
    [
        {"audience": None},
        {"tenant_claim": None},
        {"leeway_s": 301},
        {"leeway_s": -1},
        {"scope_map": {"x": "superuser"}},
        {"surprise": 1},
    ],
)
def test_required_and_bounded_fields(changes: dict[str, object]) -> None:
    data = {"issuer": ISSUER, "audience": "a", "tenant_claim": "t", **changes}
    with pytest.raises(ValidationError):
        OidcIssuer.model_validate({k: v for k, v in data.items() if v is not None})


def test_an_issuer_is_listed_once() -> None:
    one = {"issuer": ISSUER, "audience": "a", "tenant_claim": "t"}
    with pytest.raises(ValidationError, match="listed once"):
        AuthConfig.model_validate({"oidc": [one, {**one, "audience": "b"}]})


def test_the_environment_sets_the_issuers(tmp_path: Path) -> None:
    path = tmp_path / "haif.yaml"
    path.write_text("auth:\n  backend: database\n", encoding="utf-8")
    env = {
        "HAIF_AUTH__OIDC": json.dumps(
            [{"issuer": ISSUER, "audience": "https://haif.example.com", "tenant_claim": "org",
              "create_tenants": True, "algorithms": ["ES256"]}]
        )
    }
    (config,) = load_config(path, environ=env).auth.oidc
    assert (config.issuer, config.tenant_claim, config.create_tenants) == (ISSUER, "org", True)
    assert config.algorithms == ["ES256"]
    assert config.scopes_claim == "scope"


def test_looks_like_jwt() -> None:
    header = segment({"alg": "RS256", "kid": "k"})
    assert looks_like_jwt(f"{header}.{segment({'sub': 'x'})}.c2ln")
    assert looks_like_jwt(f"{header}.{segment({'sub': 'x'})}.")  # unsigned: still the shape
    assert not looks_like_jwt("haif_0123456789abcdef0123456789abcdef")  # an API key
    assert not looks_like_jwt(f"{segment({'typ': 'JWT'})}.e30.c2ln")  # no alg
    assert not looks_like_jwt(f"{segment(['alg'])}.e30.c2ln")  # not an object
    assert not looks_like_jwt("a.b.c")
    assert not looks_like_jwt(f"{header}.e30")
    assert not looks_like_jwt("")
    assert not looks_like_jwt(f"{header}.{'A' * MAX_TOKEN_CHARS}.c2ln")


async def _no_tenants(name: str, create: bool) -> TenantRecord | None:
    raise AssertionError("a refused token reached the tenant lookup")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        f"{segment({'alg': 'RS256', 'kid': 'k'})}.{segment({'iss': 'https://other.example'})}.c2ln",
        f"{segment({'alg': 'none', 'kid': 'k'})}.{segment({'iss': ISSUER})}.",
        f"{segment({'alg': 'HS256', 'kid': 'k'})}.{segment({'iss': ISSUER})}.c2ln",
        f"{segment({'alg': 'RS256'})}.{segment({'iss': ISSUER})}.c2ln",  # no kid
        f"{segment({'alg': 'RS256', 'kid': 'k'})}.{segment({'iss': ISSUER, 'pad': 'x' * 9000})}.c2ln",
    ],
)
async def test_refused_before_any_fetch(token: str) -> None:
    auth = OidcAuthenticator([issuer()], _no_tenants)
    with pytest.raises(AuthenticationFailed) as refused:
        await auth.authenticate(token)
    assert refused.value.message == AUTH_FAILED_MESSAGE
    assert auth.fetches == 0
