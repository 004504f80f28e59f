from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from haif.bridge.routers.common import ERROR_RESPONSES, IDEMPOTENT, service
from haif.protocol import EmbeddingRequest, EmbeddingResponse

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES, openapi_extra=IDEMPOTENT
)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await service(request).embeddings(body, request)
