"""Builds the Bridge's FastAPI application (the OpenAI-compatible HTTP surface), the
ingress of each Gateway replica: its routes run the replica's pipeline in process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from haif import __version__
from haif.bridge.errors import install_error_handlers
from haif.bridge.middleware import EdgeMiddleware, MetricsMiddleware
from haif.bridge.routers import admin, chat, completions, embeddings, health, jobs, models
from haif.bridge.serving import BridgeService
from haif.telemetry.metrics import BridgeMetrics, MetricsReader, MetricsTarget, ProcessMetrics

if TYPE_CHECKING:
    from haif.gateway.pipeline import Pipeline

    from haif.config import HaifConfig


def build_app(config: HaifConfig, pipeline: Pipeline, process: ProcessMetrics | None = None) -> FastAPI:
    """The HTTP app over ``pipeline``; its request metrics go to ``process`` (the Gateway
    replica's own metrics; a pusher of its own when not given)."""
    app = FastAPI(
        title="HAIF",
        version=__version__,
        description="OpenAI-compatible inference API of HAIF.",
    )
    target = MetricsTarget.from_config(config)
    process = process or ProcessMetrics.start(target, "gateway")
    metrics = BridgeMetrics(process, (m.name for m in config.models))
    app.state.service = BridgeService(config, pipeline, metrics, MetricsReader(target))
    for module in (health, models, completions, chat, embeddings, jobs, admin):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=config.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    return app
