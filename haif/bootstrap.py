"""What must exist before the platform starts: state, schema, models, and (``auth.dev_key``)
the development key and its tenant.

The development key is a convenience of ``make serve`` (``configs/local.yaml`` asks for
it): its plaintext stays in ``state_dir/dev_api_key`` (mode 0600) so that the developer
sees the same key after a restart; the metadata store holds only its hash, like any
token's. Without ``auth.dev_key`` no key is minted or printed: a production deployment's
first admin token comes from ``haif admin bootstrap --tenant NAME``, shown once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from haif.exceptions import ConfigError

if TYPE_CHECKING:
    from haif.config import HaifConfig

logger = logging.getLogger("haif.bootstrap")

DEV_KEY_FILE = "dev_api_key"
DEV_KEY_NAME = "development key"
DEV_KEY_SCOPES = ("admin", "inference")


def ensure_dev_key(config: HaifConfig) -> HaifConfig:
    """Return ``config`` with a development API key, created once under ``state_dir``, when
    ``auth.dev_key`` asks for one; else ``config`` as it is."""
    if not config.auth.dev_key or config.auth.dev_api_key:
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
    """Upgrade the schema; with ``auth.dev_key``, create the dev tenant and register the dev
    key's hash if missing.

    Raises:
        ConfigError: ``auth.dev_key`` is on and the key is unset (``ensure_dev_key`` first).
    """
    from haif.store import open_database
    from haif.store.tenants import TenantRepository
    from haif.store.tokens import TokenRepository

    key = config.auth.dev_api_key
    if config.auth.dev_key and key is None:
        raise ConfigError("auth.dev_api_key is unset: ensure_tenancy registers it (ensure_dev_key first)")
    db = open_database(config, pool_size=1)
    if key is None:
        db.close()  # migrated: nothing else to set up without a development key
        return
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


# Where Ray unpacks a runtime_env's working_dir (``ray job submit --working-dir``):
# <session dir>/runtime_resources/working_dir_files/<package>/.
_RAY_WORKING_DIR_COPY = ("runtime_resources", "working_dir_files")
BASE_DIR_ENV = "HAIF_BASE_DIR"


def in_ray_working_dir_copy(path: Path) -> bool:
    """Whether ``path`` lies inside the copy of a job's working directory that Ray made."""
    parts = path.parts
    return any(parts[i : i + 2] == _RAY_WORKING_DIR_COPY for i in range(len(parts) - 1))


def state_paths(config: HaifConfig) -> dict[str, Path]:
    """The config's local state, by key: what would be lost with the directory it is in."""
    base = config.base_path()
    paths = {"server.state_dir": config.state_path()}
    url = config.database_url()
    if url.startswith("sqlite") and ":///" in url:
        paths["database.url"] = Path(url.partition(":///")[2])
    artifacts = config.artifacts
    for i, replica in enumerate(artifacts.replicas):
        replica_url = replica if isinstance(replica, str) else replica.url
        if "://" not in replica_url:
            paths[f"artifacts.replicas[{i}]"] = base / replica_url
    paths["artifacts.cache_dir"] = base / artifacts.cache_dir
    if artifacts.dev_signing_key:
        paths["artifacts.dev_signing_key"] = base / artifacts.dev_signing_key
    return paths


def warn_ephemeral_state(config: HaifConfig) -> list[str]:
    """Log a WARNING when local state would live in Ray's copy of a job's working directory.

    ``ray job submit --working-dir .`` runs the job in a temporary copy of the directory,
    so relative paths resolve inside it: the SQLite database, the artifact replicas and the
    development keys would be made anew for every submission whose files differ, and go
    when Ray removes the copy. Returns the keys named in the warning.
    """
    doomed = {key: path for key, path in state_paths(config).items() if in_ray_working_dir_copy(path.absolute())}
    if doomed:
        logger.warning(
            "HAIF's local state would live in Ray's temporary copy of the job's working directory "
            "(%s), and go with it: %s. Give it a directory of its own: "
            "ray job submit --runtime-env-json '{\"env_vars\": {\"%s\": \"/absolute/dir\"}}' ... "
            "(relative paths resolve against it), or absolute paths for these keys.",
            config.base_path(), ", ".join(f"{key} = {path}" for key, path in doomed.items()), BASE_DIR_ENV,
        )
    return sorted(doomed)


def prepare(config: HaifConfig) -> HaifConfig:
    """Everything ``haif serve`` / ``serve run`` needs before deploying."""
    warn_ephemeral_state(config)
    config = ensure_dev_key(config)
    if config.auth.backend == "database":
        ensure_tenancy(config)
    ensure_dev_models(config)
    from haif.artifacts.dev import ensure_dev_artifacts  # lazy: fsspec, cryptography

    ensure_dev_artifacts(config)
    return config
