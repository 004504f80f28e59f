"""A refused request is one log line, never an ERROR with a traceback: a bad API key or an
unknown model, over HTTP and through the in-cluster SDK, leaves no ERROR in the logs of the
Gateway replicas (where the request is handled) or of the Orchestrator."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.support.deployment import Deployment
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _replica_logs(deployment: str) -> dict[str, str]:
    """Each live replica's logs of ``deployment``, by actor id: HAIF's JSON lines (the
    process's stderr) and Serve's own log file of the replica (where it logs a request
    that raised, "Request failed.", with the traceback)."""
    from ray.util.state import get_log, list_actors

    replicas = list_actors(
        filters=[("class_name", "=", f"ServeReplica:haif:{deployment}"), ("state", "=", "ALIVE")]
    )
    assert replicas, f"no live {deployment} replica"
    logs = {}
    for r in replicas:
        tag = r.name.rsplit("#", 1)[-1]
        serve_log = f"serve/replica_haif_{deployment}_{tag}.log"
        logs[r.actor_id] = "".join(get_log(actor_id=r.actor_id, suffix="err", tail=100_000)) + "".join(
            get_log(node_id=r.node_id, filename=serve_log, tail=100_000)
        )
    return logs


def _level(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return "ERROR" if line.startswith(("ERROR", "Traceback")) else None
    if not isinstance(record, dict):
        return None
    return record.get("level") or record.get("levelname")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if _level(line) == "ERROR" or "Traceback" in line]


def test_refused_requests_leave_no_error_in_the_replica_logs(haif: Deployment, http: httpx.Client) -> None:
    from haif.exceptions import AuthenticationFailed, ModelNotFound
    from haif.sdk import HandleClient

    before = {name: {a: len(_errors(t)) for a, t in _replica_logs(name).items()} for name in ("Gateway", "Orchestrator")}
    marks = []
    for _ in range(3):  # both Gateway replicas get some, whatever the proxy picks
        bad_key = f"refused-{uuid.uuid4().hex[:12]}"
        resp = http.post("/v1/completions", headers={"Authorization": "Bearer nope", "X-Request-ID": bad_key},
                         json={"model": "echo", "prompt": "hi"})
        assert resp.status_code == 401
        unknown = f"refused-{uuid.uuid4().hex[:12]}"
        resp = http.post("/v1/chat/completions", headers={**haif.headers(), "X-Request-ID": unknown},
                         json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
        marks += [bad_key, unknown]
    with pytest.raises(AuthenticationFailed):
        HandleClient("not-a-key").completions({"model": "echo", "prompt": "hi"})
    with pytest.raises(ModelNotFound):
        HandleClient(haif.api_key).completions({"model": "no-such-model", "prompt": "hi"})
    with pytest.raises(ModelNotFound):
        list(HandleClient(haif.api_key).completions_stream({"model": "no-such-model", "prompt": "hi"}))

    # Each HTTP refusal is logged once, as one INFO line naming the request.
    def logged() -> str | None:
        text = "".join(_replica_logs("Gateway").values())
        return text if all(m in text for m in marks) else None

    text = wait_for(logged, 20, 0.5, "the refusals in the Gateway logs")
    for mark in marks:
        lines = [line for line in text.splitlines() if f"request {mark}:" in line]
        assert len(lines) == 1 and _level(lines[0]) == "INFO", lines
    after = {name: {a: _errors(t) for a, t in _replica_logs(name).items()} for name in ("Gateway", "Orchestrator")}
    for name, replicas in after.items():
        for actor, errors in replicas.items():
            new = errors[before[name].get(actor, 0):]
            assert not new, f"{name} replica {actor} logged: {new[:5]}"
