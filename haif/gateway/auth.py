"""Authentication: API key → Principal. The tenancy store plugs in behind ``Authenticator``."""

from __future__ import annotations

import hmac
from typing import Protocol

from haif.envelope import Principal
from haif.exceptions import AuthenticationFailed

# One body for every authentication failure, so that a caller learns nothing about
# which part of its credential was wrong.
AUTH_FAILED_MESSAGE = "invalid or missing API key"
MAX_KEY_CHARS = 512


class Authenticator(Protocol):
    async def authenticate(self, api_key: str | None) -> Principal:
        """Return who ``api_key`` belongs to.

        Raises:
            AuthenticationFailed: the key is missing, unknown, expired or revoked.
        """
        ...


class StaticKeyAuthenticator:
    """Accepts exactly one key (the development key of the config), compared in constant time."""

    def __init__(self, api_key: str, tenant: str) -> None:
        self._key = api_key.encode("utf-8")
        self._principal = Principal(tenant=tenant, scopes=frozenset({"inference", "admin"}))

    async def authenticate(self, api_key: str | None) -> Principal:
        if not api_key or len(api_key) > MAX_KEY_CHARS:
            raise AuthenticationFailed(AUTH_FAILED_MESSAGE)
        if not hmac.compare_digest(api_key.encode("utf-8", "surrogateescape"), self._key):
            raise AuthenticationFailed(AUTH_FAILED_MESSAGE)
        return self._principal
