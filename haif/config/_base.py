"""What every config module shares: the base model, artifact name patterns, runtimes, sources."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

from haif.exceptions import ConfigError

PACKAGE_SCHEME = "python-package:"


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ARTIFACT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
ARTIFACT_REF_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._+-]{0,127}|sha256:[0-9a-f]{64})$"


RuntimeName = Literal["echo", "torch", "embeddings", "vllm"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)


def resolve_source(spec: str, base: Path | None = None) -> Path:
    """A directory on this node: a path (relative to ``base``) or ``python-package:PKG/SUBDIR``.

    Raises:
        ConfigError: the package is not installed.
    """
    if spec.startswith(PACKAGE_SCHEME):
        package, _, sub = spec[len(PACKAGE_SCHEME):].partition("/")
        try:
            root = Path(str(resources.files(package)))
        except ModuleNotFoundError as exc:
            raise ConfigError(f"package {package!r} of {spec!r} is not installed") from exc
        return root / sub if sub else root
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path.resolve()
