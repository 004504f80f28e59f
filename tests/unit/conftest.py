"""Unit-tier fixtures: a migrated SQLite metadata store in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from haif.store import Database, open_database
from tests.support.sqlite import sqlite_config


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    db = open_database(sqlite_config(tmp_path), migrate=True)
    yield db
    db.close()
