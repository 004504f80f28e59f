"""The shim's Noise key: a 32-byte seed file in ``state_dir``, created on first start.

hyperdht derives its key pair with sodium's ``crypto_sign_seed_keypair``: an Ed25519
key whose private seed is the file's 32 bytes. The same seed through ``cryptography``'s
Ed25519 gives the same public key, so HAIF knows (and prints) the shim's public key
without starting Node; a test checks the two agree.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from haif.exceptions import ConfigError, InvalidRequest

SEED_BYTES = 32
PUBLIC_KEY_HEX_CHARS = 64
_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")


def load_or_create_seed(path: Path) -> bytes:
    """The seed in ``path``, written first (mode 0600) when there is none.

    Two processes starting at once agree: the file appears whole, once, and the loser
    reads the winner's seed.

    Raises:
        ConfigError: the file cannot be read or written, or does not hold 32 bytes.
    """
    try:
        return _check(path.read_bytes(), path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read the P2P seed file {path}: {exc.strerror}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        seed = secrets.token_bytes(SEED_BYTES)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(seed)
                out.flush()
                os.fsync(out.fileno())
            # link() never replaces: whoever linked first owns the seed.
            os.link(tmp, path)
        except FileExistsError:
            return _check(path.read_bytes(), path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the P2P seed file {path}: {exc.strerror}") from exc
    return seed


def public_key(seed: bytes) -> bytes:
    """The Ed25519 public key hyperdht's ``keyPair(seed)`` has."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes, not {len(seed)}")
    key = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_hex(path: Path) -> str:
    """The public key of the seed in ``path`` (created when missing), as 64 hex characters."""
    return public_key(load_or_create_seed(path)).hex()


def parse_public_key(text: str) -> str:
    """``text`` as a normalized (lower-case) hex public key.

    Raises:
        InvalidRequest: it is not 64 hex characters.
    """
    key = text.strip().lower()
    if not _HEX_KEY.match(key):
        raise InvalidRequest(
            f"a P2P public key is {PUBLIC_KEY_HEX_CHARS} hex characters, not {text[:80]!r}"
        )
    return key


def _check(seed: bytes, path: Path) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"the P2P seed file {path} holds {len(seed)} bytes, not {SEED_BYTES}")
    return seed
