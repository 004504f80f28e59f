"""The worker's health probe: a loaded model whose engine died makes the worker ``dead``, so
that the Orchestrator replaces it instead of routing requests to it that all fail."""

from __future__ import annotations

import pytest

from actors.loaded import LoadedModel
from haif.runtimes.base import Runtime

pytestmark = pytest.mark.unit


class _Engine(Runtime):
    name = "engine"
    capabilities = frozenset({"generate"})

    def __init__(self) -> None:  # no context: the probe reads dead() alone
        self.reason: str | None = None

    async def load(self) -> None:
        return None

    def dead(self) -> str | None:
        return self.reason


def _worker(runtime: Runtime | None):  # noqa: ANN202
    from actors.worker import ModelWorker

    worker = ModelWorker.__new__(ModelWorker)  # the probe alone: no Ray
    worker._current = LoadedModel(key="builtin", runtime=runtime) if runtime is not None else None
    worker._state, worker._in_flight, worker._draining = "ready", 3, False
    return worker


def test_a_worker_whose_engine_died_answers_its_probe_dead() -> None:
    engine = _Engine()
    worker = _worker(engine)
    assert worker.ping()[:2] == ("ready", 3)
    engine.reason = "the engine core died"
    assert worker.ping()[:2] == ("dead", 3)
    worker._draining = True  # a worker being drained or unloaded stops its engine on purpose
    assert worker.ping()[0] == "draining"


def test_a_runtime_is_alive_unless_it_says_otherwise() -> None:
    assert _worker(None).ping()[0] == "ready"
    assert Runtime.dead(_Engine()) is None  # the base's default
