"""The HTTP Bridge: the Ray Serve ingress deployment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray import serve

from haif.bridge.app import build_app
from haif.telemetry.logs import install_json_logs
from haif.telemetry.tracing import setup_tracing

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig


@serve.ingress()
class Bridge:
    def __init__(self, config: HaifConfig, gateway: DeploymentHandle) -> None:
        region = config.regions[0].name
        setup_tracing(config.telemetry, "bridge", region=region, instance=_replica_id())
        install_json_logs(config.telemetry, "bridge")
        self._config = config
        self._gateway = gateway

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self._config, self._gateway)


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests, tools): no id to record
        return None
