from __future__ import annotations

from typing import TYPE_CHECKING, Any

from haif.protocol import ErrorResponse

if TYPE_CHECKING:
    from fastapi import Request

    from haif.bridge.serving import BridgeService

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed request",
        401: "Missing or invalid API key",
        403: "Not allowed",
        404: "Unknown model",
        413: "Body too large",
        422: "Invalid field or limit exceeded",
        429: "Rate limited or overloaded (Retry-After)",
        503: "Model or service not available",
        504: "Deadline exceeded",
    }.items()
}


def service(request: Request) -> BridgeService:
    return request.app.state.service
