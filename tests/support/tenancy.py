"""Tenants and tokens made with the `haif` CLI; what the workers served."""

from __future__ import annotations

import uuid

from tests.support.deployment import haif_cli


def new_tenant(store_env: dict[str, str], *limits: str) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    haif_cli(store_env, "tenants", "create", name, *limits)
    return name


def new_token(store_env: dict[str, str], tenant: str, *options: str) -> str:
    out = haif_cli(store_env, "tokens", "create", "--tenant", tenant, *options)
    return out.strip().splitlines()[-1]  # the token is the last line


def served(orchestrator, model: str = "echo") -> int:  # noqa: ANN001
    """Requests the model's workers have served: the number that says whether a worker ran."""
    return sum(w["served"] for w in orchestrator.workers_info.remote(model).result())
