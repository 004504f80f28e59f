"""haif.exceptions: the tree its docstring draws is the class tree; every error survives pickling
(Ray hops) and maps to an OpenAI body."""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass

import pytest

from haif import exceptions as errors
from haif.exceptions import HaifError, Overloaded, RateLimited, unwrap
from haif.protocol import ErrorResponse

pytestmark = pytest.mark.unit


def module_classes() -> dict[str, type[BaseException]]:
    """Every public exception class defined in haif/exceptions.py (``_RetryAfter``, a mixin
    that carries ``Retry-After``, is not a node of the tree)."""
    return {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
        and not name.startswith("_")
    }


def tree_parent(cls: type[BaseException]) -> str | None:
    """The class the tree hangs ``cls`` under: its first public base in the module."""
    for base in cls.__mro__[1:]:
        if base.__module__ == errors.__name__ and not base.__name__.startswith("_"):
            return base.__name__
    return None


@dataclass(frozen=True)
class Drawn:
    """One line of the tree in the module docstring."""

    name: str
    parent: str | None
    status: int | None  # the HTTP status column, when the line has one
    names: tuple[str, ...]  # what follows it: the OpenAI error type and/or code


_LINE = re.compile(
    r"^(?P<prefix>(?:[│ ]   )*(?:[├└]── )?)(?P<name>[A-Z][A-Za-z]*)"
    r"(?:\s+(?P<status>\d{3})\s+(?P<names>[a-z_]+(?:\s*/\s*[a-z_]+)*))?(?:\s|$)"
)


def drawn_tree() -> list[Drawn]:
    """The tree drawn in the docstring of haif/exceptions.py, parent by indentation."""
    doc = errors.__doc__ or ""
    block = doc.split("::\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]  # the literal block
    lines = []
    for raw in block.splitlines():
        assert raw.startswith("    "), f"not part of the indented tree: {raw!r}"
        lines.append(raw[4:])
    out: list[Drawn] = []
    stack: list[str] = []
    for line in lines:
        match = _LINE.match(line)
        assert match is not None, f"cannot read this line of the tree: {line!r}"
        depth = len(match["prefix"]) // 4
        assert depth <= len(stack), f"{match['name']} is indented deeper than its parent could be"
        del stack[depth:]
        names = tuple(n.strip() for n in match["names"].split("/")) if match["names"] else ()
        status = int(match["status"]) if match["status"] else None
        out.append(Drawn(match["name"], stack[-1] if stack else None, status, names))
        stack.append(match["name"])
    return out


def test_the_drawing_reads_as_a_tree() -> None:
    tree = drawn_tree()
    assert tree[0] == Drawn("HaifError", None, None, ())
    assert len(tree) > 30  # the whole drawing was read, not its first lines
    assert len({d.name for d in tree}) == len(tree), "a class is drawn twice"


def test_every_class_is_drawn_under_its_parent() -> None:
    drawn = {d.name: d.parent for d in drawn_tree()}
    actual = {name: tree_parent(cls) for name, cls in module_classes().items()}
    assert sorted(set(actual) - set(drawn)) == [], "classes missing from the drawing"
    assert sorted(set(drawn) - set(actual)) == [], "drawn, but no such class"
    wrong = {name: (drawn[name], actual[name]) for name in drawn if drawn[name] != actual[name]}
    assert wrong == {}, "drawn under the wrong parent: {name: (drawn, actual)}"


def test_the_drawing_shows_each_status_type_and_code_truly() -> None:
    classes = module_classes()
    for line in drawn_tree():
        cls = classes[line.name]
        if line.status is not None:
            assert line.status == cls.status_code, line.name
            assert line.names, line.name
        for name in line.names:
            assert name in (cls.error_type, cls.code), f"{line.name}: {name!r} is not its type or code"


def test_the_parser_sees_drift() -> None:
    """The checks above would catch a class dropped, moved or invented in the drawing."""
    doc = errors.__doc__ or ""
    try:
        errors.__doc__ = doc.replace("        │   ├── WorkerDraining", "        │   ├── WorkerDrained")
        assert "WorkerDraining" not in {d.name for d in drawn_tree()}
        errors.__doc__ = doc.replace("    │   │   └── UnsupportedParameter", "    │   ├── UnsupportedParameter")
        assert {d.name: d.parent for d in drawn_tree()}["UnsupportedParameter"] == "RequestError"
    finally:
        errors.__doc__ = doc


ALL = [HaifError, *(c for c in module_classes().values() if c is not HaifError)]


def test_config_error_is_the_servers_fault() -> None:
    """A missing or wrong setting is the operator's to fix: never a 4xx, logged as an error."""
    err = errors.ConfigError("auth.dev_api_key is unset")
    assert not isinstance(err, (errors.RequestError, errors.ServiceError))
    assert err.status_code == 500
    assert err.to_body()["error"] == {
        "message": "auth.dev_api_key is unset", "type": "internal_error", "code": "config_error",
    }
    assert err.log_level == logging.ERROR
    assert errors.InvalidRequest("x").log_level == logging.INFO


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
        (errors.ConfigError, 500, "config_error"),
        (errors.InvalidRequest, 400, "invalid_request"),
        (errors.AuthenticationFailed, 401, "invalid_api_key"),
        (errors.PermissionDenied, 403, "permission_denied"),
        (errors.ModelNotFound, 404, "model_not_found"),
        (errors.PayloadTooLarge, 413, "request_too_large"),
        (errors.PromptTooLong, 422, "context_length_exceeded"),
        (errors.RateLimited, 429, "rate_limit_exceeded"),
        (errors.Overloaded, 429, "overloaded"),
        (errors.ModelNotReady, 503, "model_not_ready"),
        (errors.WorkerDraining, 503, "worker_draining"),
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
