"""Loading: the YAML file, ``HAIF_*`` environment overrides, validation into ``HaifConfig``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from haif.config.root import HaifConfig
from haif.exceptions import ConfigError

ENV_PREFIX = "HAIF_"
ENV_CONFIG_PATH = "HAIF_CONFIG"
DEFAULT_CONFIG_PATH = "configs/local.yaml"
# A scalar a validation error quotes is cut to this many characters.
MAX_QUOTED_INPUT_CHARS = 80


def _parse_env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``HAIF_A__B=value`` applied at path ``a.b``."""
    result: dict[str, Any] = dict(data)
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or key == ENV_CONFIG_PATH:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX):].split("__") if part]
        if not path or path[0] not in HaifConfig.model_fields:
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return result


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> HaifConfig:
    """Load the config file at ``path`` (or ``$HAIF_CONFIG``, or the default) with overrides.

    Raises:
        ConfigError: the file is missing, not YAML, or does not validate.
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path or environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {config_path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {config_path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {config_path} must be a mapping at the top level")
    data = apply_env_overrides(data, environ)
    data.setdefault("base_dir", str(Path.cwd()))
    try:
        return HaifConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {config_path} is invalid:\n{describe_errors(exc)}") from exc


def describe_errors(exc: ValidationError) -> str:
    """One line per error of ``exc``: the key's path, pydantic's message and the value given::

        server.port: Input should be less than or equal to 65535 (given: 70000)
        models.0.torch.max_batchsize: Extra inputs are not permitted (given: 4)
    """
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        if error["type"] != "missing" and isinstance(given, str | int | float | bool):
            quoted = repr(given)
            if len(quoted) > MAX_QUOTED_INPUT_CHARS:
                quoted = quoted[:MAX_QUOTED_INPUT_CHARS] + "..."
            message += f" (given: {quoted})"
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)
