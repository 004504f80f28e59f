"""A real OpenID provider (panva's ``oidc-provider``, tests/support/oidc/) on loopback.

The test owns the provider's keys: ``new_keyset()`` makes them, the provider signs with
them (it reads them from a JWK Set file), and ``SigningKey.sign`` forges tokens with a
``kid`` the provider publishes, for the claims no real provider would issue (expired, no
audience...). ``OidcProvider.restart(keys)`` rotates the keys on the same port.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.net import free_port
from tests.support.waiting import wait_for

PROVIDER_DIR = Path(__file__).parent / "oidc"
NODE = shutil.which("node") or "node"
# Node's start plus oidc-provider's import on a loaded 2-core machine.
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SCOPES = "haif:inference haif:admin haif:tenant_admin"
# The resource (audience) the integration deployment's auth.oidc names.
AUDIENCE = "https://haif.test/api"
# The provider's clients and the haif_tenant claim each one's tokens carry (provider.js).
CLIENT_TENANTS = {
    "tenant-a": "acme", "tenant-b": "globex", "suspended": "frozen", "unknown": "nobody", "no-tenant": None,
}


def require_provider_install() -> None:
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"run `make install` first: {PROVIDER_DIR}/node_modules is missing")


@dataclass(frozen=True)
class SigningKey:
    """A private key of the provider's, with its ``kid``."""

    kid: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str  # the algorithm it signs with by default

    def jwk(self) -> dict[str, Any]:
        """The private JWK (what the provider loads)."""
        codec = RSAAlgorithm if isinstance(self.private, rsa.RSAPrivateKey) else ECAlgorithm
        data = codec.to_jwk(self.private, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig"}

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], alg: str | None = None, kid: str | None = None) -> str:
        """A JWT of ``claims`` signed by this key (header ``kid``: this key's, or ``kid``)."""
        headers = {"kid": kid or self.kid, "typ": "at+jwt"}
        return jwt.encode(claims, self.private, algorithm=alg or self.alg, headers=headers)


def new_keyset() -> list[SigningKey]:
    """An RSA key (it signs the provider's tokens) and a P-256 key, each with a fresh kid."""
    return [
        SigningKey(f"rsa-{uuid.uuid4().hex[:12]}", rsa.generate_private_key(65537, 2048), "RS256"),
        SigningKey(f"ec-{uuid.uuid4().hex[:12]}", ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ]


class OidcProvider:
    """``node provider.js PORT JWKS_FILE`` as a child process; one port for its whole life."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        require_provider_install()
        self.port = port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._workdir = workdir
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self.keys: list[SigningKey] = []

    def start(self, keys: list[SigningKey] | None = None) -> None:
        """Start with ``keys`` (a new keyset by default); return once it serves."""
        if self._proc is not None:
            raise RuntimeError("the provider is running")
        self.keys = keys or new_keyset()
        jwks_file = self._workdir / f"jwks-{uuid.uuid4().hex[:8]}.json"
        jwks_file.write_text(json.dumps({"keys": [k.jwk() for k in self.keys]}), encoding="utf-8")
        self._lines = []
        proc = subprocess.Popen(
            [NODE, "provider.js", str(self.port), str(jwks_file)],
            cwd=PROVIDER_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self._proc = proc
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
        wait_for(
            lambda: proc.poll() is not None or f"ready {self.issuer}" in self._lines,
            READY_TIMEOUT_S, 0.05, "the OIDC provider's ready line",
        )
        if proc.poll() is not None:
            self._proc = None
            raise RuntimeError(f"the OIDC provider exited {proc.returncode}: {''.join(self._lines)[-4000:]}")

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def restart(self, keys: list[SigningKey] | None = None) -> None:
        """Rotate: the same issuer and port, another keyset (a new one by default)."""
        self.stop()
        self.start(keys)

    @property
    def output(self) -> str:
        return "\n".join(self._lines)

    def token(self, client_id: str, audience: str, scope: str = "haif:inference") -> str:
        """An access token (a JWT) by client credentials, for the resource ``audience``."""
        resp = httpx.post(
            f"{self.issuer}/token",
            auth=(client_id, f"secret-{client_id}"),
            data={"grant_type": "client_credentials", "resource": audience, "scope": scope},
            timeout=30,
        )
        if resp.status_code != 200:
            raise RuntimeError(f"token endpoint answered {resp.status_code}: {resp.text}")
        return resp.json()["access_token"]
