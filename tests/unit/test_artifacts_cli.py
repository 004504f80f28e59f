"""`haif keys generate` and `haif models publish|list|verify|pull|repair` on local replicas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from haif.cli.main import app

pytestmark = pytest.mark.unit


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(os.urandom(200_000))
    (tmp_path / "model" / "config.json").write_text("{}")
    config = {
        "artifacts": {
            "replicas": ["store/r1", "store/r2", "store/r3"],
            "cache_dir": "cache",
            "trusted_keys": ["keys/release.key.pub"],
        }
    }
    (tmp_path / "haif.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def haif(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--config", "haif.yaml"], env=env)
    return result.exit_code, result.output


def publish(name: str, version: str = "1") -> None:
    code, out = haif(
        "models", "publish", "model", "--name", name, "--version", version,
        "--key", "keys/release.key",
    )  # fmt: skip
    assert code == 0, out


def test_the_artifact_lifecycle(setup: Path) -> None:
    code, out = haif("keys", "generate", "--out", "keys/release.key")
    assert code == 0 and "key id:" in out and (setup / "keys" / "release.key.pub").exists()
    assert (
        haif("keys", "generate", "--out", "keys/release.key")[0] == 2
    )  # never overwritten silently

    code, out = haif(
        "models",
        "publish",
        "model",
        "--name",
        "m",
        "--version",
        "1",
        "--key",
        "keys/release.key",
        "--runtime",
        "torch",
    )
    assert code == 0, out
    assert "published m:1: 2 files" in out and "3/3 replicas" in out
    code, out = haif("models", "list")
    assert code == 0 and "m:1" in out and "3/3" in out

    code, out = haif("models", "verify", "m:1")
    assert code == 0, out
    assert "signature and 2 blobs ok on 3 replicas" in out

    blobs = sorted(p for p in (setup / "store" / "r2" / "blobs").rglob("*") if p.is_file())
    data = bytearray(blobs[0].read_bytes())
    data[0] ^= 1
    blobs[0].write_bytes(bytes(data))
    code, out = haif("models", "verify", "m:1")
    assert code == 3, out  # usable, degraded
    assert "store/r2: corrupt" in out

    code, out = haif("models", "pull", "m:1")
    assert code == 0, out
    view = Path(out.strip().splitlines()[-1])
    assert (view / "weights.bin").read_bytes() == (setup / "model" / "weights.bin").read_bytes()

    code, out = haif("models", "repair", "m:1")
    assert code == 0, out
    assert "repaired:" in out and "store/r2" in out
    assert haif("models", "verify", "m:1")[0] == 0

    assert haif("keys", "generate", "--out", "keys/other.key")[0] == 0
    code, out = haif("models", "verify", "m:1", "--trusted-key", "keys/other.key.pub")
    assert code == 1 and "not signed by a trusted key" in out


def test_errors_exit_nonzero(setup: Path) -> None:
    assert haif("keys", "generate", "--out", "keys/release.key")[0] == 0
    code, out = haif("models", "verify", "nope:1")
    assert code == 1 and "artifact nope:1 not found" in out
    assert haif("models", "pull", "bad ref")[0] == 2
    assert (
        haif(
            "models",
            "publish",
            "missing-dir",
            "--name",
            "m",
            "--version",
            "1",
            "--key",
            "keys/release.key",
        )[0]
        == 2
    )
    code, out = haif("models", "repair", "nope:1")
    assert code == 1
    # The same bytes under the same version are fine; other bytes are refused.
    args = (
        "models",
        "publish",
        "model",
        "--name",
        "m",
        "--version",
        "1",
        "--key",
        "keys/release.key",
    )
    assert haif(*args)[0] == 0 and haif(*args)[0] == 0
    (setup / "model" / "config.json").write_text('{"changed": true}')
    code, out = haif(*args)
    assert code == 1 and "already published with other content" in out


LONG_NAME = "a-model-name-" + "x" * 107  # 120 characters


def test_list_never_cuts_a_name_in_a_narrow_terminal(setup: Path) -> None:
    assert haif("keys", "generate", "--out", "keys/release.key")[0] == 0
    publish(LONG_NAME)
    publish("m")
    code, out = haif("models", "list", env={"COLUMNS": "80"})
    assert code == 0, out
    rows = [line for line in out.splitlines() if f"{LONG_NAME}:1" in line]
    assert len(rows) == 1  # whole, on one line: copyable and greppable
    assert "3/3" in rows[0] and "sha256:" in rows[0]
    assert "…" not in out  # no cell of any column was cut with an ellipsis
    assert any(" m:1 " in line for line in out.splitlines())


def test_list_json_is_every_artifact_unabridged(setup: Path) -> None:
    assert haif("keys", "generate", "--out", "keys/release.key")[0] == 0
    assert haif("models", "list", "--json")[1].strip() == "[]"
    publish(LONG_NAME)
    publish("m", "2")
    result = CliRunner().invoke(
        app, ["models", "list", "--json", "--config", "haif.yaml"], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [a["ref"] for a in listed] == [f"{LONG_NAME}:1", "m:2"]
    first = listed[0]
    assert set(first) == {
        "ref", "manifest_digest", "files", "total_bytes", "signer", "created_at", "replicas",
        "base", "base_manifest",  # a LoRA adapter's base (None for a model)
    }  # fmt: skip
    assert len(first["manifest_digest"]) == 64  # the whole digest, not the table's prefix
    assert first["files"] == 2 and first["total_bytes"] == 200_002
    assert first["replicas"] == ["store/r1", "store/r2", "store/r3"]
    code, out = haif("models", "verify", f"sha256:{first['manifest_digest']}")
    assert code == 0, out  # what --json prints is usable as it is
