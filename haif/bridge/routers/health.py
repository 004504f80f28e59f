from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from haif.bridge.routers.common import service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: every enabled model has a ready worker")
async def readyz(request: Request) -> JSONResponse:
    return await service(request).ready()


@router.get(
    "/metrics",
    summary="Prometheus metrics of the whole platform (every replica and worker, merged)",
    response_class=PlainTextResponse,
    responses={503: {"description": "Metrics are disabled or the aggregator did not answer"}},
)
async def metrics(request: Request) -> Response:
    return await service(request).metrics_text()
