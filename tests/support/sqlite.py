"""An embedded (SQLite) HAIF configuration in a temporary directory."""

from __future__ import annotations

from pathlib import Path

from haif.config import HaifConfig


def sqlite_config(tmp_path: Path, **sections: object) -> HaifConfig:
    return HaifConfig.model_validate(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "database": {"url": f"sqlite:///{tmp_path / 'haif.db'}"},
            "base_dir": str(tmp_path),
            **sections,
        }
    )
