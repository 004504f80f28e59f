"""Unit-tier fixtures: a migrated SQLite metadata store in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from haif.config import HaifConfig
from haif.store import Database, open_database


def sqlite_config(tmp_path: Path, **sections: object) -> HaifConfig:
    return HaifConfig.model_validate(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "database": {"url": f"sqlite:///{tmp_path / 'haif.db'}"},
            "base_dir": str(tmp_path),
            **sections,
        }
    )


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    db = open_database(sqlite_config(tmp_path), migrate=True)
    yield db
    db.close()
