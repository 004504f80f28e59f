"""haif.sdk._http.error_from: HTTP status + OpenAI body → the most specific HAIF error."""

from __future__ import annotations

from typing import Any

import pytest

from haif import exceptions as errors
from haif.sdk._http import error_from

pytestmark = pytest.mark.unit


def body(code: str | None, message: str = "boom", type_: str = "x") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "model_not_found", errors.ModelNotFound),
        (404, "not_found", errors.NotFound),
        (422, "context_length_exceeded", errors.PromptTooLong),
        (422, "unsupported_operation", errors.UnsupportedOperation),
        (422, "invalid_value", errors.UnprocessableRequest),
        (401, "invalid_api_key", errors.AuthenticationFailed),
        (401, None, errors.AuthenticationFailed),
        (401, "something_else", errors.AuthenticationFailed),
        (400, "invalid_json", errors.InvalidRequest),
        (403, "permission_denied", errors.PermissionDenied),
        (409, "conflict", errors.Conflict),
        (413, "request_too_large", errors.PayloadTooLarge),
        (429, "rate_limit_exceeded", errors.RateLimited),
        (429, "overloaded", errors.Overloaded),
        (503, "model_not_ready", errors.ModelNotReady),
        (503, "worker_unavailable", errors.WorkerUnavailable),
        (503, "gpu_unavailable", errors.GpuUnavailable),
        (503, "model_load_failed", errors.ModelLoadFailed),
        (503, "service_unavailable", errors.ServiceError),
        (504, "timeout", errors.DeadlineExceeded),
        (500, "internal_error", errors.InternalError),
        (502, None, errors.InternalError),
        (599, "weird", errors.InternalError),
    ],
)
def test_maps_status_and_code(status: int, code: str | None, cls: type[errors.HaifError]) -> None:
    err = error_from(status, body(code, message="the message"))
    assert type(err) is cls
    assert err.message == "the message"


def test_code_wins_over_status() -> None:
    # A 404 whose code says model_not_found is the specific class, not plain NotFound.
    assert type(error_from(404, body("model_not_found"))) is errors.ModelNotFound
    assert isinstance(error_from(404, body("model_not_found")), errors.NotFound)


@pytest.mark.parametrize("payload", [None, "Bad Gateway", ["x"], 42, {}, {"error": {}}])
def test_non_openai_body(payload: Any) -> None:
    err = error_from(502, payload)
    assert type(err) is errors.InternalError
    assert err.message == "HTTP 502"
    err = error_from(404, payload)
    assert type(err) is errors.NotFound
    assert err.message == "HTTP 404"


def test_empty_message_falls_back_to_status() -> None:
    assert error_from(400, body("invalid_request", message="")).message == "HTTP 400"


@pytest.mark.parametrize("payload", [{"error": "Bad Gateway"}, {"error": None}])
def test_error_field_not_a_mapping(payload: Any) -> None:
    # A proxy in front of HAIF may answer {"error": "Bad Gateway"}: the client must
    # still raise a HAIF error, not AttributeError.
    err = error_from(502, payload)
    assert type(err) is errors.InternalError
