"""haif.exceptions: every error survives pickling (Ray hops) and maps to an OpenAI body."""

from __future__ import annotations

import pickle

import pytest

from haif import exceptions as errors
from haif.exceptions import HaifError, Overloaded, RateLimited, unwrap
from haif.protocol import ErrorResponse

pytestmark = pytest.mark.unit


def all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            out.append(sub)
        out.extend(all_subclasses(sub))
    return sorted(set(out), key=lambda c: c.__name__)


ALL = [HaifError, *all_subclasses(HaifError)]


def test_the_tree_is_complete() -> None:
    names = {c.__name__ for c in ALL}
    assert {
        "ConfigError", "InvalidRequest", "AuthenticationFailed", "PermissionDenied", "NotFound",
        "ModelNotFound", "Conflict", "PayloadTooLarge", "UnprocessableRequest", "PromptTooLong",
        "UnsupportedOperation", "RateLimited", "ModelNotReady", "WorkerUnavailable", "Overloaded",
        "DeadlineExceeded", "GpuUnavailable", "ModelLoadFailed", "InternalError",
    } <= names


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_pickle_round_trip(cls: type[HaifError]) -> None:
    err = cls("something went wrong: ünïcode")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.message == err.message
    assert str(back) == str(err)
    assert back.to_body() == err.to_body()
    assert back.status_code == err.status_code


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_body_is_openai_shaped(cls: type[HaifError]) -> None:
    body = cls("msg").to_body()
    assert set(body) == {"error"}
    assert body["error"] == {"message": "msg", "type": cls.error_type, "code": cls.code}
    assert all(isinstance(v, str) and v for v in body["error"].values())
    ErrorResponse.model_validate(body)
    assert 400 <= cls.status_code <= 599


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.InvalidRequest, 400, "invalid_request"),
        (errors.AuthenticationFailed, 401, "invalid_api_key"),
        (errors.PermissionDenied, 403, "permission_denied"),
        (errors.ModelNotFound, 404, "model_not_found"),
        (errors.PayloadTooLarge, 413, "request_too_large"),
        (errors.PromptTooLong, 422, "context_length_exceeded"),
        (errors.RateLimited, 429, "rate_limit_exceeded"),
        (errors.Overloaded, 429, "overloaded"),
        (errors.ModelNotReady, 503, "model_not_ready"),
        (errors.DeadlineExceeded, 504, "timeout"),
        (errors.GpuUnavailable, 503, "gpu_unavailable"),
        (errors.InternalError, 500, "internal_error"),
    ],
)
def test_status_and_code(cls: type[HaifError], status: int, code: str) -> None:
    assert (cls.status_code, cls.code) == (status, code)


def test_families() -> None:
    assert issubclass(errors.PromptTooLong, errors.RequestError)
    assert issubclass(errors.RateLimited, errors.RequestError)
    assert issubclass(errors.Overloaded, errors.RetryableError)
    assert not issubclass(errors.DeadlineExceeded, errors.RetryableError)
    assert not issubclass(errors.RateLimited, errors.ServiceError)


@pytest.mark.parametrize("cls", [RateLimited, Overloaded])
def test_retry_after_survives_pickling(cls: type[HaifError]) -> None:
    err = cls("slow down", retry_after_s=7.4)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.retry_after_s == 7.4
    assert back.message == "slow down"
    assert back.headers() == {"Retry-After": "8"}  # rounded up: never retry too early


def test_retry_after_header_is_at_least_one_second() -> None:
    assert RateLimited("x", retry_after_s=0.01).headers() == {"Retry-After": "1"}
    assert Overloaded("x").headers() == {"Retry-After": "1"}
    assert Overloaded("x", retry_after_s=30).headers() == {"Retry-After": "30"}


def test_other_errors_have_no_headers() -> None:
    assert errors.InvalidRequest("x").headers() == {}
    assert errors.InternalError("x").headers() == {}


class _TaskError(Exception):
    """Stands in for a Ray task error that hands over only ``cause``."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__("task failed")
        self.cause = cause


def test_unwrap_returns_the_cause() -> None:
    inner = errors.ModelNotFound("no such model")
    assert unwrap(_TaskError(inner)) is inner
    assert unwrap(_TaskError(_TaskError(inner))) is inner


def test_unwrap_without_cause_is_identity() -> None:
    plain = ValueError("x")
    assert unwrap(plain) is plain
    no_cause = _TaskError(None)
    assert unwrap(no_cause) is no_cause
    not_exc = _TaskError(None)
    not_exc.cause = "a string"  # type: ignore[assignment]
    assert unwrap(not_exc) is not_exc


def test_unwrap_self_cause_does_not_loop() -> None:
    err = _TaskError(None)
    err.cause = err
    assert unwrap(err) is err
