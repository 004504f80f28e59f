"""`haif rollout set|promote|rollback|status|list` and `haif workers drain` on the embedded SQLite store."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from typer.testing import CliRunner

from haif.cli.main import app
from haif.store import Database, open_database
from haif.store.rollouts import pending_drains, read_rollouts, report_canary
from tests.support.net import free_port
from tests.support.sqlite import sqlite_config

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.unit

MODELS = [
    {"name": "tiny-llama", "runtime": "torch", "artifact": "tiny-llama:1"},
    {"name": "echo", "runtime": "echo", "version": "a"},
    {"name": "dev", "runtime": "torch", "path": "models/dev"},
]


@pytest.fixture
def port() -> int:
    return free_port()  # nothing listens there unless a test serves /readyz on it


@pytest.fixture
def cfg(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "haif.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"state_dir": str(tmp_path / "state"), "port": port},
                "database": {"url": f"sqlite:///{tmp_path / 'state' / 'haif.db'}"},
                "models": MODELS,
            }
        )
    )
    return path


def run(cfg: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def rollout_set(cfg: Path, model: str, version: str, weight: str, code: int = 0) -> str:
    return run(cfg, "rollout", "set", model, "--version", version, "--weight", weight, code=code)


@contextmanager
def _db(tmp_path: Path) -> Iterator[Database]:
    """The store the CLI wrote (the config's)."""
    url = f"sqlite:///{tmp_path / 'state' / 'haif.db'}"
    db = open_database(sqlite_config(tmp_path, database={"url": url}))
    try:
        yield db
    finally:
        db.close()


def _report(tmp_path: Path, model: str, status: str, reason: str | None = None) -> None:
    """What the Orchestrator would write about the canary's workers."""
    with _db(tmp_path) as db, db.begin() as conn:
        generation = read_rollouts(conn)[model].generation
        assert report_canary(conn, model, generation, status, reason)


def _status(cfg: Path, model: str) -> dict:
    return json.loads(run(cfg, "rollout", "status", model, "--json"))


def test_set_promote_and_status(cfg: Path, tmp_path: Path) -> None:
    out = rollout_set(cfg, "tiny-llama", "2", "30")
    assert "rollout of tiny-llama: 1 70%, 2 30% (generation 1)" in out
    assert "artifact tiny-llama:2" in out
    s = _status(cfg, "tiny-llama")
    assert (s["stable_version"], s["canary_version"], s["weights"]) == ("1", "2", {"1": 70, "2": 30})
    assert (s["canary_status"], s["auto_rollbacks"], s["live"]) == (None, 0, None)
    text = run(cfg, "rollout", "status", "tiny-llama")
    assert "canary status: not reported yet" in text and "asked weights: 1 70%, 2 30%" in text
    assert "live: no running deployment answers" in text

    assert "not ready (status: not reported yet)" in run(cfg, "rollout", "promote", "tiny-llama", code=1)
    _report(tmp_path, "tiny-llama", "failed", "artifact tiny-llama:2 refused: untrusted signer")
    out = run(cfg, "rollout", "promote", "tiny-llama", code=1)
    assert "status: failed: artifact tiny-llama:2 refused: untrusted signer" in out
    assert "reason: artifact tiny-llama:2 refused" in run(cfg, "rollout", "status", "tiny-llama")

    rollout_set(cfg, "tiny-llama", "3", "50")  # replaces the failed one
    _report(tmp_path, "tiny-llama", "ready")
    out = run(cfg, "rollout", "promote", "tiny-llama")
    assert "promoted tiny-llama: version 3 at 100%" in out and "drains version 1's workers" in out
    s = _status(cfg, "tiny-llama")
    assert (s["stable_version"], s["canary_version"], s["weights"]) == ("3", None, {"3": 100})
    assert s["config_version"] == "1"
    assert "no canary to promote" in run(cfg, "rollout", "promote", "tiny-llama", code=1)


def test_rollback(cfg: Path) -> None:
    assert "no canary to roll back" in run(cfg, "rollout", "rollback", "echo", code=1)
    assert "the echo runtime" in rollout_set(cfg, "echo", "b", "10")
    out = run(cfg, "rollout", "rollback", "echo")
    assert "rolled back echo: version a at 100%" in out and "drains version b's workers" in out
    s = _status(cfg, "echo")
    assert (s["canary_version"], s["weights"]) == (None, {"a": 100})
    assert s["reason"] == "rolled back by the operator"


def test_refusals_and_their_exit_codes(cfg: Path) -> None:
    assert "no model 'nope' in the config" in rollout_set(cfg, "nope", "2", "5", code=1)
    assert "no model 'nope'" in run(cfg, "rollout", "status", "nope", code=1)
    assert "no model 'nope'" in run(cfg, "rollout", "promote", "nope", code=1)
    assert "no model 'nope'" in run(cfg, "rollout", "rollback", "nope", code=1)
    for weight in ("101", "-1"):
        assert "between 0 and 100" in rollout_set(cfg, "tiny-llama", "2", weight, code=2)
    rollout_set(cfg, "tiny-llama", "2", "many", code=2)
    assert "already the stable version" in rollout_set(cfg, "tiny-llama", "1", "5", code=1)
    out = rollout_set(cfg, "dev", "2", "5", code=2)
    assert "served from a path: a rollout needs a published artifact" in out
    assert json.loads(run(cfg, "rollout", "list", "--json"))[0]["canary_version"] is None  # nothing written


def test_list_shows_every_model_of_the_config(cfg: Path) -> None:
    rollout_set(cfg, "tiny-llama", "2", "25")
    listed = json.loads(run(cfg, "rollout", "list", "--json"))
    assert [(r["model"], r["weights"], r["canary_version"]) for r in listed] == [
        ("tiny-llama", {"1": 75, "2": 25}, "2"),
        ("echo", {"a": 100}, None),
        ("dev", {"1": 100}, None),
    ]
    table = run(cfg, "rollout", "list")
    assert "tiny-llama" in table and "1 75%, 2 25%" in table and "a 100%" in table


def test_a_redeploy_with_another_version_supersedes_the_rollout(cfg: Path) -> None:
    rollout_set(cfg, "tiny-llama", "2", "25")
    data = yaml.safe_load(cfg.read_text())
    data["models"][0].update(artifact="tiny-llama:2", version="2")
    cfg.write_text(yaml.safe_dump(data))
    s = _status(cfg, "tiny-llama")
    assert (s["stable_version"], s["canary_version"], s["weights"]) == ("2", None, {"2": 100})
    assert "no canary to roll back" in run(cfg, "rollout", "rollback", "tiny-llama", code=1)
    assert "rollout of tiny-llama: 2 90%, 3 10%" in rollout_set(cfg, "tiny-llama", "3", "10")


@pytest.fixture
def readyz(port: int) -> Iterator[dict]:
    """A deployment's /readyz at the config's URL, answering with the dict the test fills."""
    body: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = json.dumps(body).encode()
            self.send_response(200 if self.path == "/readyz" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield body
    server.shutdown()
    server.server_close()


def test_status_shows_what_the_running_deployment_reports(cfg: Path, readyz: dict) -> None:
    readyz["models"] = {"echo": {"state": "ready", "ready_workers": 1, "workers_by_state": {"ready": 1}}}
    assert _status(cfg, "echo")["live"] == {"state": "ready", "workers_by_state": {"ready": 1}}
    readyz["models"]["tiny-llama"] = {
        "state": "ready",
        "versions": ["1", "2"],
        "weights": {"1": 70, "2": 30},
        "workers_by_state": {"loading": 1, "ready": 2},
        "error": None,
    }
    out = run(cfg, "rollout", "status", "tiny-llama")
    assert "live state: ready" in out
    assert "live versions: 1, 2" in out
    assert "live weights: 1=70, 2=30" in out
    assert "live workers by state: loading=1, ready=2" in out
    readyz.clear()  # a deployment that does not know the model
    assert _status(cfg, "tiny-llama")["live"] is None


def test_workers_drain(cfg: Path, tmp_path: Path) -> None:
    out = run(cfg, "workers", "drain", "tiny-llama/local/0#abcdef12")
    assert "drain of tiny-llama/local/0#abcdef12 requested" in out and "within a few seconds" in out
    assert "worker id" in run(cfg, "workers", "drain", "has space", code=2)
    with _db(tmp_path) as db, db.connect() as conn:
        assert pending_drains(conn) == ["tiny-llama/local/0#abcdef12"]
