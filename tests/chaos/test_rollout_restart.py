"""A rollout survives the Orchestrator: SIGKILL of its replica mid-rollout leaves the
versions, their weights and their workers as they were (the rollout is a row of the
metadata store, the workers are detached actors the new replica adopts)."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.support.cluster import model_workers, orchestrator_replicas
from tests.support.deployment import Deployment
from tests.support.waiting import wait_for

pytestmark = pytest.mark.chaos

MODEL = "canaried"


def _weights(haif: Deployment) -> dict:
    return httpx.get(f"{haif.url}/readyz", timeout=10).json()["models"][MODEL]["weights"]


def test_a_rollout_survives_an_orchestrator_restart(
    chaos_haif: Deployment, chaos_orchestrator, chaos_pg_url: str  # noqa: ANN001
) -> None:
    from sqlalchemy import create_engine

    from haif.config import ModelConfig
    from haif.store.db import Database
    from haif.store.rollouts import RolloutRepository

    db = Database(create_engine(chaos_pg_url))
    try:
        with db.session() as session:
            RolloutRepository(session).set(MODEL, ModelConfig(name=MODEL, runtime="echo").version, "2", 40)
    finally:
        db.engine.dispose()
    wait_for(lambda: _weights(chaos_haif) == {"1": 60, "2": 40}, 60, 0.2, "the 60/40 split")
    before = {w["worker_id"]: (w["version"], w["pid"]) for w in model_workers(chaos_orchestrator, MODEL)}
    assert sorted(v for v, _ in before.values()) == ["1", "2"], before
    (replica,) = orchestrator_replicas()
    os.kill(replica.pid, signal.SIGKILL)
    wait_for(lambda: (r := orchestrator_replicas()) and r[0].pid != replica.pid, 120, 0.5,
             "Serve to start a new Orchestrator replica")
    after = wait_for(
        lambda: (ws := model_workers(chaos_orchestrator, MODEL)) and len(ws) == 2
        and all(w["state"] == "ready" for w in ws) and ws,
        60, 0.5, "the new replica to adopt both versions' workers",
    )
    assert {w["worker_id"]: (w["version"], w["pid"]) for w in after} == before, "the same workers"
    status = chaos_orchestrator.status.remote().result()["models"][MODEL]
    assert status["weights"] == {"1": 60, "2": 40}
    assert _weights(chaos_haif) == {"1": 60, "2": 40}
    with httpx.Client(base_url=chaos_haif.url, headers=chaos_haif.headers(), timeout=30) as http:
        prints = {
            http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).json()[
                "system_fingerprint"
            ]
            for _ in range(40)
        }
    assert prints == {f"{MODEL}:1", f"{MODEL}:2"}
