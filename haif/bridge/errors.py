"""Maps every failure to an OpenAI-shaped error body, once, at the HTTP boundary."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haif.protocol import validation_message
from haif.exceptions import (
    HaifError,
    InternalError,
    PayloadTooLarge,
    unwrap,
)

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

logger = logging.getLogger("haif.bridge")

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
    """The HAIF error for any exception raised while serving; anything else is a bug: it is
    logged with its traceback and answered 500 without one."""
    err = unwrap(exc)
    if isinstance(err, HaifError):
        return err
    logger.error("unhandled error while serving: %r", err, exc_info=err)
    return InternalError("internal error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HaifError)
    async def _haif(request: Request, exc: HaifError) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.log(exc.log_level, "request %s: %d %s: %s", request_id, exc.status_code, exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, status = validation_message(list(exc.errors()))
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
