"""Maps every failure to an OpenAI-shaped error body, once, at the HTTP boundary."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haif.exceptions import (
    HaifError,
    InternalError,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    unwrap,
)

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

logger = logging.getLogger("haif.bridge")

MAX_ERROR_DETAILS = 5
MAX_MESSAGE_CHARS = 1000

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
}


def error_response(err: HaifError) -> JSONResponse:
    return JSONResponse(err.to_body(), status_code=err.status_code, headers=err.headers())


def as_haif_error(exc: BaseException) -> HaifError:
    """The HAIF error for any exception raised while serving (unknown ones become 500/503)."""
    err = unwrap(exc)
    if isinstance(err, HaifError):
        return err
    name = type(err).__name__
    if name == "BackPressureError":  # Serve's replica queues are full
        return Overloaded("the service is at capacity; retry later", retry_after_s=1.0)
    if name in {"DeploymentUnavailableError", "RayServeException"}:
        return ServiceError("the service is not available; retry later")
    logger.error("unhandled error while serving: %r", err, exc_info=err)
    return InternalError("internal error")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, int]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", 400
    parts: list[str] = []
    for e in errors:
        # Drop pydantic's union/validator tags ("list[str]", "function-after[...]").
        loc = ".".join(
            str(p) for p in e.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p)
        ) or "body"
        part = f"{loc}: {e.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    more = len(parts) - MAX_ERROR_DETAILS
    parts = parts[:MAX_ERROR_DETAILS]
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)[:MAX_MESSAGE_CHARS], 422


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HaifError)
    async def _haif(_: Request, exc: HaifError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, status = _validation_message(list(exc.errors()))
        body = {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_value"}}
        if status == 400:
            body["error"]["code"] = "invalid_json"
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 413:
            return error_response(PayloadTooLarge(str(exc.detail)))
        message = exc.detail if isinstance(exc.detail, str) else "invalid request"
        body = {
            "error": {
                "message": message[:MAX_MESSAGE_CHARS],
                "type": _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error"),
                "code": str(status),
            }
        }
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_haif_error(exc))


def invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message[:MAX_MESSAGE_CHARS])
