"""Unit-tier fixtures: a migrated SQLite metadata store in a temporary directory; vLLM's
classes faked (no engine starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from haif.store import Database, open_database
from tests.support.fake_vllm import FakeAsyncLLM, install_fake_vllm
from tests.support.sqlite import sqlite_config


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    db = open_database(sqlite_config(tmp_path), migrate=True)
    yield db
    db.close()


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeAsyncLLM]:
    """vLLM's engine-argument and engine classes, nothing else: no engine starts."""
    return install_fake_vllm(monkeypatch)
