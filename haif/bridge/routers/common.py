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
        404: "Unknown model or record",
        409: "Idempotency-Key reused with a different request",
        413: "Body too large",
        422: "Invalid field or limit exceeded",
        429: "Rate limited or overloaded (Retry-After)",
        503: "Model or service not available",
        504: "Deadline exceeded",
    }.items()
}


# Documented here; the Bridge reads the header itself and the Gateway validates it.
IDEMPOTENT: dict[str, Any] = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 255},
            "description": "Same key + same body: the stored response, executed and billed once; "
            "same key + another body: 409. Not with stream: true (400).",
        }
    ]
}


def service(request: Request) -> BridgeService:
    return request.app.state.service
