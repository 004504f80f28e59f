"""Which keys may sign artifacts: one policy of the config, for everyone who checks a signature.

``trusted_keys`` is the only place trust is decided. The CLI (``haif models verify``, the
base check of ``haif models publish --base``), the server's first start
(``haif.artifacts.dev``) and every worker's loader (``ArtifactLoader``: models and LoRA
adapters) call it, so a model that ``haif models verify`` accepts is one a worker loads,
and an adapter it refuses is one a worker refuses.

The policy is the config's ``artifacts.trusted_keys`` (every artifact) and
``artifacts.model_trusted_keys`` (per artifact name: only those), and, when
``artifacts.dev_signing_key`` is set, the development key's public key, trusted as the
config's own ``trusted_keys`` are. The server generates that key on its first start
(``haif.artifacts.dev.ensure_signing_key``); until then nothing is signed by it, and this
reads it without ever creating one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from haif.artifacts.keys import (
    PublicKey,
    TrustPolicy,
    load_public_key,
    load_signing_key,
    public_path,
)

if TYPE_CHECKING:
    from haif.config import ArtifactsConfig


def dev_key_path(config: ArtifactsConfig, base: Path | None) -> Path | None:
    """Where the development signing key lives (relative paths from ``base``), or None when
    the config has none."""
    if config.dev_signing_key is None:
        return None
    path = Path(config.dev_signing_key).expanduser()
    return path if path.is_absolute() or base is None else base / path


def dev_public_key(config: ArtifactsConfig, base: Path | None) -> PublicKey | None:
    """The development key's public key once the key exists, else None.

    Read from the private key when it is there (the key that signs), else from its
    ``PATH.pub``.

    Raises:
        ConfigError: the key file exists but holds no Ed25519 key.
    """
    path = dev_key_path(config, base)
    if path is None:
        return None
    if path.exists():
        return load_signing_key(path).public_key
    public = public_path(path)
    if public.exists():
        return load_public_key(str(public))
    return None


def trusted_keys(config: ArtifactsConfig, base: Path | None = None) -> TrustPolicy:
    """The trust policy of ``config`` (relative key paths from ``base``, the config's
    ``base_path()``): its trusted keys and the development key, when it has one.

    Raises:
        ConfigError: a configured key is unreadable or not an Ed25519 public key.
    """
    policy = TrustPolicy.from_config(config, base)
    dev = dev_public_key(config, base)
    if dev is None or dev in policy.global_keys:
        return policy
    # Like the config's `trusted_keys`: every artifact but those `model_trusted_keys` restricts.
    return TrustPolicy(global_keys=(*policy.global_keys, dev), per_name=policy.per_name)
