"""Test tiers follow the folders (markers, not skips: `-m unit`, `integration`, `chaos`, `deploy`).

- tests/unit: fast and in process. No Ray, no PostgreSQL/Redis/Node servers, nothing off
  the machine; at most an in-process loopback stub (a fake /readyz) or a short Python
  child process (process-tree tests).
- tests/integration: real processes and sockets. The session's Ray cluster and HAIF
  deployment start once, for the first test that requests them; the others start only
  what they request (PostgreSQL, Redis, moto S3, the Node P2P sidecar and testnet).
- tests/chaos: a three-node Ray cluster and deployment of their own that the tests break;
  run in a pytest process of their own (`make test` runs them after the others).
- tests/deploy: the documented ways to deploy (docs/deploy.md) run as written, on a
  `ray start` cluster of their own; a pytest process of their own, after chaos.

Helpers live in tests/support; conftest files hold fixtures only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TIERS = {"unit", "integration", "chaos", "deploy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(ROOT / "tests").parts[0]
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _no_admin_api_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The operator commands run on the database unless a test names an admin API: neither
    the caller's HAIF_URL / HAIF_TOKEN nor a profile in their ~/.config/haif applies."""
    for name in ("HAIF_URL", "HAIF_TOKEN", "HAIF_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
