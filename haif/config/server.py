"""The HTTP ingress and its Serve deployments, request limits, authentication."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from haif.config._base import ConfigModel
from haif.protocol import MAX_CHOICES, MAX_TOP_LOGPROBS

logger = logging.getLogger(__name__)

# Server keys of the four-hop design, accepted with a warning and ignored.
_RETIRED_SERVER_KEYS = {
    "bridge_replicas": "the HTTP Bridge is the Gateway's ingress now: set server.gateway_replicas",
    "handle_transport": "no request crosses a Serve handle between HAIF's deployments any more",
}


class ServerConfig(ConfigModel):
    host: str = Field("127.0.0.1", description="Address the HTTP ingress listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP ingress.")
    app_name: str = Field("haif", description="Name of the Ray Serve application.")
    gateway_replicas: int = Field(
        1, ge=1, le=64, description="Replicas of the Gateway (each one serves HTTP and routes to workers)."
    )
    orchestrator_replicas: int = Field(
        1, ge=1, le=16, description="Replicas of the Orchestrator (one leads the fleet, the others stand by)."
    )
    max_ongoing_requests: int = Field(
        256, ge=1, le=100_000, description="Concurrent requests one Gateway replica accepts."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="End-to-end deadline of one request (default)."
    )
    min_request_timeout_s: float = Field(
        0.05, gt=0, le=3600, description="Smallest deadline a client may ask for (X-Request-Timeout)."
    )
    max_request_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="Largest deadline a client may ask for (X-Request-Timeout)."
    )
    state_dir: str = Field(".haif", description="Directory for local state (dev key, caches).")
    access_log: bool = Field(
        False, description="Ray Serve per-call access logs in every replica (costly on the hot path)."
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Ray Serve runs HTTP proxies: every node, or the head node only."
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="How HTTP reaches the Gateway: Serve's HTTP proxy actor, or HAProxy on host:port "
        "in front of the Gateway replicas' own HTTP servers (Ray Serve's direct ingress; the Ray "
        "cluster must run with RAY_SERVE_ENABLE_HA_PROXY=1, which `haif serve` sets for a cluster "
        "it starts).",
    )
    control_resource: str | None = Field(
        None,
        description="Ray custom resource of the nodes that run the Gateway and Orchestrator "
        "replicas (unset: any node).",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, why in _RETIRED_SERVER_KEYS.items():
            if key in data:
                data.pop(key)
                logger.warning("server.%s is deprecated and ignored: %s", key, why)
        return data


class LimitsConfig(ConfigModel):
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest accepted HTTP body (413 above)."
    )
    max_prompt_tokens: int = Field(
        4096, ge=1, le=1_048_576, description="Largest prompt, in the model's tokens (422 above)."
    )
    max_tokens: int = Field(
        2048, ge=1, le=1_048_576, description="Largest `max_tokens` a request may ask for."
    )
    default_max_tokens: int = Field(
        128, ge=1, le=1_048_576, description="`max_tokens` when a request gives none."
    )
    max_embedding_inputs: int = Field(
        256, ge=1, le=100_000, description="Most inputs in one embeddings request."
    )
    max_prompts_per_request: int = Field(
        16, ge=1, le=1024, description="Most prompts in one /v1/completions request."
    )
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Most `stop` strings.")
    max_choices: int = Field(
        8, ge=1, le=MAX_CHOICES, description="Most choices per prompt (`n`); each is a generation of its own."
    )
    max_logprobs: int = Field(
        MAX_TOP_LOGPROBS, ge=0, le=MAX_TOP_LOGPROBS,
        description="Most alternatives per token (chat `top_logprobs`, completions `logprobs`).",
    )
    object_ref_threshold_bytes: int = Field(
        64 * 1024,
        ge=0,
        le=1024**3,
        description="Payloads at least this large cross Ray hops as object references.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        return self


# Asymmetric JWS algorithms an issuer may use; "none" and the HMAC family are never accepted
# (an HMAC "secret" would be the issuer's public key, which anyone can read).
JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
DEFAULT_SCOPE_MAP = {
    "haif:inference": "inference", "haif:admin": "admin", "haif:tenant_admin": "tenant_admin"
}
HaifScope = Literal["inference", "admin", "tenant_admin"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OidcIssuer(ConfigModel):
    issuer: str = Field(
        min_length=1, max_length=2048,
        description="The issuer's URL, exactly as its tokens' `iss` claim reads; its keys come from "
        "`{issuer}/.well-known/openid-configuration`. `https://`, or `http://` on a loopback host only.",
    )
    audience: str = Field(
        min_length=1, max_length=2048,
        description="The `aud` a token must name (HAIF's resource identifier at this issuer).",
    )
    tenant_claim: str = Field(
        min_length=1, max_length=256, description="Claim that names the HAIF tenant (403 without it)."
    )
    scopes_claim: str = Field(
        "scope", min_length=1, max_length=256,
        description="Claim that holds the token's scopes: a space-separated string or a list.",
    )
    scope_map: dict[str, HaifScope] = Field(
        default_factory=lambda: dict(DEFAULT_SCOPE_MAP),
        description="The issuer's scope values → HAIF scopes; a value not in the map grants nothing.",
    )
    models_claim: str | None = Field(
        None, min_length=1, max_length=256,
        description="Claim that lists the models the token may use (unset or absent: every model "
        "its tenant may use).",
    )
    create_tenants: bool = Field(
        False,
        description="A tenant HAIF does not know is created with the default quotas (false: refused, 403).",
    )
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=lambda: ["RS256", "ES256", "PS256", "EdDSA"], min_length=1, max_length=10,
        description="Signature algorithms accepted from this issuer (asymmetric ones only).",
    )
    leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed on `exp`, `nbf` and `iat`."
    )
    jwks_cache_s: float = Field(
        300.0, ge=1, le=86_400, description="How long the issuer's keys are used before they are fetched again."
    )
    refetch_cooldown_s: float = Field(
        10.0, ge=0.1, le=3600,
        description="Least time between two fetches of the keys (for an unknown `kid`, a refresh, or "
        "a retry of an unreachable issuer): a flood of random kids makes a bounded number of fetches.",
    )
    max_stale_s: float = Field(
        300.0, ge=0, le=86_400,
        description="While the issuer is unreachable, its last keys serve until this long after their "
        "last successful fetch; then its tokens are refused with 503 (never accepted unchecked).",
    )
    fetch_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Timeout of one fetch of the discovery document or the keys."
    )

    @field_validator("algorithms", mode="before")
    @classmethod
    def _asymmetric_only(cls, value: Any) -> Any:
        for alg in value if isinstance(value, list) else ():
            if isinstance(alg, str) and (alg.lower() == "none" or alg.upper().startswith("HS")):
                raise ValueError(f"{alg} is not accepted: only asymmetric signature algorithms are")
        return value

    @field_validator("issuer")
    @classmethod
    def _secure_issuer(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("an issuer is an https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("an issuer URL has no query or fragment")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("an http:// issuer is accepted only on a loopback host; use https://")
        return value


class AuthConfig(ConfigModel):
    backend: Literal["database", "static"] = Field(
        "database",
        description="database: tenants and API tokens in the metadata store; "
        "static: only the development key (dev_key), no quotas, jobs or usage (benchmark baseline).",
    )
    dev_key: bool = Field(
        False,
        description="Mint the development key (admin and inference scopes, tenant dev_tenant) and print it "
        "at start (`API key:`). configs/local.yaml turns it on; off by default, so a production start "
        "mints and prints no secret: its first admin token comes from `haif admin bootstrap`.",
    )
    dev_api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="The development key's value; generated once into state_dir when unset. Giving one "
        "turns dev_key on (an explicit dev_key: false beside it is an error).",
    )
    dev_tenant: str = Field("default", description="Tenant the development key belongs to.")
    token_cache_ttl_s: float = Field(
        5.0, ge=0, le=3600,
        description="How long a credential (a token lookup, a verified JWT, a JWT's tenant) is cached. "
        "Revocations, suspensions and quota changes made through the admin API or the CLI do not wait "
        "for it (the auth epoch drops every replica's cache); only edits of the database by hand do.",
    )
    change_poll_s: float = Field(
        0.25, gt=0, le=10,
        description="How often each Orchestrator replica reads the last auth change (a revoked token, a "
        "suspended tenant) and, when new, sends it to every Gateway replica with the routing table: a "
        "change made through the admin API reaches them at once, one made on the database within this.",
    )
    token_cache_max_entries: int = Field(
        10_000, ge=1, le=10_000_000, description="Token lookups (good and bad) kept per Gateway replica."
    )
    oidc: list[OidcIssuer] = Field(
        default_factory=list, max_length=32,
        description="Trusted OpenID issuers: a JWT access token of one is accepted beside HAIF's API keys.",
    )

    @field_validator("oidc")
    @classmethod
    def _distinct_issuers(cls, value: list[OidcIssuer]) -> list[OidcIssuer]:
        seen = [item.issuer for item in value]
        if len(set(seen)) != len(seen):
            raise ValueError("each issuer is listed once")
        return value

    @model_validator(mode="before")
    @classmethod
    def _dev_key_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dev_api_key") is not None:
            if data.get("dev_key", True) in (False, "false", "False", "0", 0):
                raise ValueError("auth.dev_api_key is set but auth.dev_key is false: drop one")
            data = {**data, "dev_key": True}
        return data
