from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from haif.bridge.routers.common import service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: every enabled model has a ready worker")
async def readyz(request: Request) -> JSONResponse:
    return await service(request).ready()
