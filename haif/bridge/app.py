"""Builds the Bridge's FastAPI application (the OpenAI-compatible HTTP surface)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from haif import __version__
from haif.bridge.errors import install_error_handlers
from haif.bridge.middleware import EdgeMiddleware, MetricsMiddleware
from haif.bridge.routers import chat, completions, embeddings, health, jobs, models
from haif.bridge.serving import BridgeService
from haif.telemetry.metrics import BridgeMetrics, MetricsReader, MetricsTarget, ProcessMetrics

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig


def build_app(config: HaifConfig, gateway: DeploymentHandle) -> FastAPI:
    app = FastAPI(
        title="HAIF",
        version=__version__,
        description="OpenAI-compatible inference API of HAIF.",
    )
    target = MetricsTarget.from_config(config)
    metrics = BridgeMetrics(ProcessMetrics.start(target, "bridge"), (m.name for m in config.models))
    app.state.service = BridgeService(config, gateway, metrics, MetricsReader(target))
    for module in (health, models, completions, chat, embeddings, jobs):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=config.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    return app
