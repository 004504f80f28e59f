from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from haif.bridge.routers.common import ERROR_RESPONSES, IDEMPOTENT, service
from haif.protocol import CompletionRequest, CompletionResponse

router = APIRouter(tags=["completions"])


@router.post(
    "/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES, openapi_extra=IDEMPOTENT
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await service(request).generate("completion", body, request)
