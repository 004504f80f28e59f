"""What the Orchestrator and Ray report about a running deployment."""

from __future__ import annotations

from typing import Any


def model_workers(orchestrator: Any, model: str) -> list[dict]:
    """The Orchestrator's view of ``model``'s workers (``orchestrator``: its deployment handle)."""
    return orchestrator.workers_info.remote(model).result()


def orchestrator_replicas() -> list:
    """The live Orchestrator replica actors of the ``haif`` app."""
    from ray.util.state import list_actors

    return list_actors(
        filters=[("class_name", "=", "ServeReplica:haif:Orchestrator"), ("state", "=", "ALIVE")]
    )
