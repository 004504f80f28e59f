"""The HTTP Bridge: the Ray Serve ingress deployment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray import serve

from haif.bridge.app import build_app

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig


@serve.ingress()
class Bridge:
    def __init__(self, config: HaifConfig, gateway: DeploymentHandle) -> None:
        self._config = config
        self._gateway = gateway

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self._config, self._gateway)
