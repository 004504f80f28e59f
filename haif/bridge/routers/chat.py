from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from haif.bridge.routers.common import ERROR_RESPONSES, IDEMPOTENT, service
from haif.protocol import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES, openapi_extra=IDEMPOTENT
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await service(request).generate("chat", body, request)
