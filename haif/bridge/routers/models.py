from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from haif.bridge.routers.common import ERROR_RESPONSES, service
from haif.protocol import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> Response:
    return await service(request).models(request)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(
    model_id: Annotated[str, Path(min_length=1, max_length=256)], request: Request
) -> Response:
    return await service(request).model(model_id, request)
