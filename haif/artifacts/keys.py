"""Ed25519 signing keys, public keys in a one-line text form, and who is trusted for what.

A private key is a PKCS#8 PEM file (mode 0600); its public key sits next to it in
``PATH.pub`` as one line, ``ed25519:<base64 of the 32 raw bytes>``: the same text the
config's ``trusted_keys`` accepts inline. A key id is the first 32 hex digits of the
sha256 of the raw public key; manifests name their signer by it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from haif.exceptions import ConfigError

if TYPE_CHECKING:
    from haif.config import ArtifactsConfig

KEY_PREFIX = "ed25519:"
PUBLIC_SUFFIX = ".pub"


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:32]

    def text(self) -> str:
        return KEY_PREFIX + base64.b64encode(self.raw).decode("ascii")

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """A key from ``ed25519:<base64>`` or a PEM SubjectPublicKeyInfo.

        Raises:
            ValueError: neither form, or not 32 bytes.
        """
        text = text.strip()
        if text.startswith(KEY_PREFIX):
            try:
                raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
            except binascii.Error as exc:
                raise ValueError(f"bad base64 in public key: {exc}") from None
            if len(raw) != 32:
                raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
            return cls(raw)
        if text.startswith("-----BEGIN PUBLIC KEY-----"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        raise ValueError(f"a public key is `{KEY_PREFIX}<base64>` or a PEM block")


class SigningKey:
    """An Ed25519 private key that signs manifests."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = PublicKey(raw)

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the private key (0600, atomically) and ``PATH.pub``.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.
        """
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, path)
        public_path(path).write_text(self.public_key.text() + "\n", encoding="ascii")


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + PUBLIC_SUFFIX)


def load_signing_key(path: Path) -> SigningKey:
    """Read a PEM private key.

    Raises:
        ConfigError: unreadable, or not an unencrypted Ed25519 key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return SigningKey(key)


def load_public_key(spec: str, base: Path | None = None) -> PublicKey:
    """A public key given inline (``ed25519:...``) or as a file (relative to ``base``).

    Raises:
        ConfigError: the file is unreadable or holds no Ed25519 public key.
    """
    if spec.strip().startswith(KEY_PREFIX):
        try:
            return PublicKey.parse(spec)
        except ValueError as exc:
            raise ConfigError(f"bad trusted key {spec[:24]!r}...: {exc}") from None
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from None
    try:
        return PublicKey.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class TrustPolicy:
    """Which public keys may sign which artifacts.

    ``per_name[N]``, when present, is the only set trusted for artifact ``N``;
    every other artifact is checked against ``global_keys``.
    """

    global_keys: tuple[PublicKey, ...] = ()
    per_name: Mapping[str, tuple[PublicKey, ...]] = field(default_factory=dict)

    def keys_for(self, name: str) -> dict[str, PublicKey]:
        keys = self.per_name.get(name, self.global_keys)
        return {k.key_id: k for k in keys}

    def also(self, key: PublicKey) -> TrustPolicy:
        """This policy, and ``key`` trusted for every artifact as well."""
        return TrustPolicy(
            global_keys=(*self.global_keys, key),
            per_name={name: (*keys, key) for name, keys in self.per_name.items()},
        )

    def with_keys(self, keys: Iterable[PublicKey]) -> TrustPolicy:
        """Only ``keys``, for every artifact (``haif models verify --trusted-key``)."""
        return TrustPolicy(global_keys=tuple(keys))

    @classmethod
    def from_config(cls, config: ArtifactsConfig, base: Path | None = None) -> TrustPolicy:
        return cls(
            global_keys=tuple(load_public_key(k, base) for k in config.trusted_keys),
            per_name={
                name: tuple(load_public_key(k, base) for k in keys)
                for name, keys in config.model_trusted_keys.items()
            },
        )
