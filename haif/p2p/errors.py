"""HAIF errors as P2P RPC errors and back: the one place the two vocabularies meet.

A P2P caller gets an @hyperswarm/rpc error whose ``code`` is ``REQUEST_ERROR`` and whose
``cause`` carries HAIF's answer: ``cause.code`` one of the codes below, ``cause.message``
the message, ``cause.context`` a JSON string ``{"type", "code", "status"[,
"retry_after_s"]}``: the OpenAI error ``type`` and ``code`` and the HTTP status the same
error has on the HTTP API.

======================  =========================================================
P2P code                HAIF errors (haif/exceptions.py)
======================  =========================================================
``UNAUTHORIZED``        AuthenticationFailed (an unknown or unmapped peer key)
``FORBIDDEN``           PermissionDenied
``MODEL_NOT_FOUND``     ModelNotFound
``NOT_FOUND``           NotFound
``CONFLICT``            Conflict (an Idempotency-Key reused with another body)
``QUOTA_EXCEEDED``      QuotaExceeded (tokens per day spent)
``RATE_LIMITED``        RateLimited
``OVERLOADED``          Overloaded (a model's queue is full)
``INVALID_REQUEST``     every other RequestError: 400, 413, 422
``TIMEOUT``             DeadlineExceeded
``UNAVAILABLE``         every other ServiceError: not ready, no worker, store down
``INTERNAL``            InternalError, and anything that is not a HaifError
======================  =========================================================

The sidecar raises some of these codes itself: ``INVALID_REQUEST`` (a value that is not
a JSON object, or larger than ``p2p.max_message_bytes``), ``OVERLOADED``
(``p2p.max_concurrent``), ``TIMEOUT`` (``p2p.request_timeout_s``), ``UNAVAILABLE``
(HAIF not connected). An unknown method is @hyperswarm/rpc's own ``UNKNOWN_METHOD``
(``err.code``, no cause).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from haif import exceptions as exc

logger = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of names its code.
_CODES: tuple[tuple[type[exc.HaifError], str], ...] = (
    (exc.AuthenticationFailed, "UNAUTHORIZED"),
    (exc.PermissionDenied, "FORBIDDEN"),
    (exc.ModelNotFound, "MODEL_NOT_FOUND"),
    (exc.NotFound, "NOT_FOUND"),
    (exc.Conflict, "CONFLICT"),
    (exc.QuotaExceeded, "QUOTA_EXCEEDED"),
    (exc.RateLimited, "RATE_LIMITED"),
    (exc.Overloaded, "OVERLOADED"),
    (exc.RequestError, "INVALID_REQUEST"),
    (exc.DeadlineExceeded, "TIMEOUT"),
    (exc.InternalError, "INTERNAL"),
    (exc.ServiceError, "UNAVAILABLE"),
)
# A code an error from a remote peer carries, when its context names no HAIF error.
_CLASSES: dict[str, type[exc.HaifError]] = {
    "UNAUTHORIZED": exc.AuthenticationFailed,
    "FORBIDDEN": exc.PermissionDenied,
    "MODEL_NOT_FOUND": exc.ModelNotFound,
    "NOT_FOUND": exc.NotFound,
    "CONFLICT": exc.Conflict,
    "QUOTA_EXCEEDED": exc.QuotaExceeded,
    "RATE_LIMITED": exc.RateLimited,
    "OVERLOADED": exc.Overloaded,
    "INVALID_REQUEST": exc.InvalidRequest,
    "TIMEOUT": exc.DeadlineExceeded,
}
# The HAIF errors a remote peer's context may name exactly: the client's faults, and the
# retryable service errors a worker reports. Its other service errors (its store, its
# artifacts, its bugs) are its own: to HAIF that worker is just unavailable.
_REMOTE_SERVICE_ERRORS = (exc.DeadlineExceeded, exc.Overloaded, exc.ModelNotReady, exc.WorkerUnavailable)
MAX_MESSAGE_CHARS = 1024


def rpc_code(error: BaseException) -> str:
    """The P2P code of ``error``."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return "INTERNAL"


def to_rpc_error(error: BaseException) -> dict[str, Any]:
    """The ``error`` object of a ``respond`` frame: ``{"code", "message", "context"}``.

    A HaifError keeps its message; anything else is a bug, logged here with its trace
    and answered ``INTERNAL`` without details.
    """
    if not isinstance(error, exc.HaifError):
        logger.error("P2P request failed unexpectedly", exc_info=error)
        error = exc.InternalError("internal error")
    context: dict[str, Any] = {
        "type": error.error_type,
        "code": error.code,
        "status": error.status_code,
    }
    retry_after_s = getattr(error, "retry_after_s", None)
    if isinstance(retry_after_s, int | float):
        context["retry_after_s"] = retry_after_s
    return {"code": rpc_code(error), "message": error.message[:MAX_MESSAGE_CHARS], "context": context}


def from_rpc_error(error: Any) -> exc.HaifError:
    """The HaifError a remote peer's answer (a ``result`` frame's ``error``) stands for.

    The HAIF code in the context picks the exact class when it names one; else the P2P
    code does; a peer that answers in words HAIF does not know (or is unreachable, or
    does not serve the method) is a WorkerUnavailable: somewhere else may serve it.
    """
    if not isinstance(error, dict):
        return exc.WorkerUnavailable("a P2P peer answered with a malformed error")
    code = error["code"] if isinstance(error.get("code"), str) else ""
    message = error.get("message") if isinstance(error.get("message"), str) else "P2P request failed"
    message = message[:MAX_MESSAGE_CHARS]
    context = _context(error.get("context"))
    cls = _by_haif_code(context.get("code")) or _CLASSES.get(code)
    if cls is None:
        return exc.WorkerUnavailable(message if code == "UNAVAILABLE" else f"{code or 'ERROR'}: {message}")
    retry_after_s = context.get("retry_after_s")
    if issubclass(cls, exc.RateLimited | exc.Overloaded) and isinstance(retry_after_s, int | float):
        return cls(message, float(retry_after_s))
    return cls(message)


def _context(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _by_haif_code(code: Any) -> type[exc.HaifError] | None:
    if not isinstance(code, str):
        return None
    if code == exc.InvalidRequest.code:
        return exc.InvalidRequest
    pending: list[type[exc.HaifError]] = [exc.RequestError, *_REMOTE_SERVICE_ERRORS]
    while pending:
        cls = pending.pop()
        if cls.__dict__.get("code") == code:
            return cls
        pending.extend(cls.__subclasses__())
    return None
