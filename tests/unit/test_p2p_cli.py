"""`haif p2p info` and `haif p2p peers add|list|remove` on the embedded SQLite store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from haif.cli.main import app
from haif.p2p.keys import public_key_hex

pytestmark = pytest.mark.unit

KEY = "ab" * 32
CONFIG_KEY = "cd" * 32


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "haif.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"state_dir": str(tmp_path / "state")},
                "database": {"url": f"sqlite:///{tmp_path / 'state' / 'haif.db'}"},
                "p2p": {"peers": {CONFIG_KEY: "beta"}, "bootstrap": ["127.0.0.1:49737"]},
            }
        )
    )
    return path


def run(cfg: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def test_info_prints_the_key_of_the_seed_in_state_dir_and_keeps_it(cfg: Path, tmp_path: Path) -> None:
    first = run(cfg, "p2p", "info")
    match = re.search(r"^public key: ([0-9a-f]{64})$", first, re.MULTILINE)
    assert match, first
    seed = tmp_path / "state" / "p2p" / "seed"
    assert match.group(1) == public_key_hex(seed)
    assert seed.stat().st_size == 32
    assert run(cfg, "p2p", "info") == first
    assert "bootstrap: 127.0.0.1:49737" in first and "host: 127.0.0.1" in first
    assert not (tmp_path / "state" / "haif.db").exists()  # no store, no deployment needed


def test_info_refuses_a_broken_seed_file(cfg: Path, tmp_path: Path) -> None:
    seed = tmp_path / "state" / "p2p" / "seed"
    seed.parent.mkdir(parents=True)
    seed.write_bytes(b"short")
    assert "holds 5 bytes" in run(cfg, "p2p", "info", code=2)


def test_peers_add_list_remove(cfg: Path) -> None:
    run(cfg, "tenants", "create", "acme")
    assert f"peer {KEY} -> tenant acme" in run(cfg, "p2p", "peers", "add", KEY.upper(), "--tenant", "acme")
    assert "already" in run(cfg, "p2p", "peers", "add", KEY, "--tenant", "acme", code=1)
    assert "64 hex" in run(cfg, "p2p", "peers", "add", "xyz", "--tenant", "acme", code=2)
    assert "no tenant" in run(cfg, "p2p", "peers", "add", "ef" * 32, "--tenant", "nobody", code=1)
    listed = [json.loads(line) for line in run(cfg, "p2p", "peers", "list", "--json").splitlines()]
    assert [(r["public_key"], r["tenant"], r["source"]) for r in listed] == [
        (KEY, "acme", "database"),
        (CONFIG_KEY, "beta", "config"),
    ]
    only = [json.loads(line) for line in run(cfg, "p2p", "peers", "list", "--json", "--tenant", "acme").splitlines()]
    assert [r["public_key"] for r in only] == [KEY]
    assert KEY in run(cfg, "p2p", "peers", "list")
    assert f"removed peer {KEY}" in run(cfg, "p2p", "peers", "remove", KEY)
    assert "no P2P peer" in run(cfg, "p2p", "peers", "remove", KEY, code=1)
    listed = [json.loads(line) for line in run(cfg, "p2p", "peers", "list", "--json").splitlines()]
    assert [r["source"] for r in listed] == ["config"]
