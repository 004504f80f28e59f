"""What must exist before the platform starts: state dir, development key, dev models."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import HaifConfig

logger = logging.getLogger("haif.bootstrap")

DEV_KEY_FILE = "dev_api_key"
DEV_KEY_PREFIX = "haif-dev-"


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
        key = DEV_KEY_PREFIX + secrets.token_urlsafe(24)
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


def prepare(config: HaifConfig) -> HaifConfig:
    """Everything ``haif serve`` / ``serve run`` needs before deploying."""
    config = ensure_dev_key(config)
    ensure_dev_models(config)
    from haif.artifacts.dev import ensure_dev_artifacts  # lazy: fsspec, cryptography

    return ensure_dev_artifacts(config)
