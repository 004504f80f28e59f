"""What must exist before the platform starts: state, schema, tenant ``default``, dev key, models.

The development key is a convenience of ``make serve``: its plaintext stays in
``state_dir/dev_api_key`` (mode 0600) so that the developer sees the same key after a
restart; the metadata store holds only its hash, like any token's. Production tokens
come from ``haif tokens create`` and are shown once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import HaifConfig

logger = logging.getLogger("haif.bootstrap")

DEV_KEY_FILE = "dev_api_key"
DEV_KEY_NAME = "development key"
DEV_KEY_SCOPES = ("admin", "inference")


def ensure_dev_key(config: HaifConfig) -> HaifConfig:
    """Return ``config`` with a development API key, created once under ``state_dir``."""
    if config.auth.dev_api_key:
        return config
    state = config.state_path()
    state.mkdir(parents=True, exist_ok=True)
    path = state / DEV_KEY_FILE
    if path.exists():
        key = path.read_text(encoding="utf-8").strip()
    else:
        from haif.store.tokens import new_token

        key, _ = new_token()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
        os.replace(tmp, path)
    auth = config.auth.model_copy(update={"dev_api_key": key})
    return config.model_copy(update={"auth": auth})


def ensure_dev_models(config: HaifConfig) -> None:
    """Build the development models the config asks for (``build:``) when missing."""
    for model in config.models:
        if model.build is None or not model.enabled:
            continue
        path = model.resolved_path(config.base_path())
        if model.build == "tiny-llama":
            from haif.devmodels.tiny_llama import build_tiny_llama

            build_tiny_llama(Path(path))


def ensure_tenancy(config: HaifConfig) -> None:
    """Upgrade the schema; create the dev tenant and register the dev key's hash if missing."""
    from haif.store import open_database
    from haif.store.tenants import TenantRepository
    from haif.store.tokens import TokenRepository

    key = config.auth.dev_api_key
    if key is None:
        raise ValueError("ensure_tenancy needs the development key (ensure_dev_key first)")
    db = open_database(config, pool_size=1)
    try:
        with db.session() as session:
            tenant = TenantRepository(session).ensure(config.auth.dev_tenant)
            tokens = TokenRepository(session)
            found = tokens.by_token(key)
            if found is None:
                tokens.create(tenant, scopes=DEV_KEY_SCOPES, name=DEV_KEY_NAME, token=key)
            elif found.revoked_at is not None:
                logger.warning(
                    "the development key was revoked; `haif tokens create --tenant %s` makes another",
                    config.auth.dev_tenant,
                )
    finally:
        db.close()


def prepare(config: HaifConfig) -> HaifConfig:
    """Everything ``haif serve`` / ``serve run`` needs before deploying."""
    config = ensure_dev_key(config)
    if config.auth.backend == "database":
        ensure_tenancy(config)
    ensure_dev_models(config)
    from haif.artifacts.dev import ensure_dev_artifacts  # lazy: fsspec, cryptography

    ensure_dev_artifacts(config)
    return config
