"""The request envelope that travels Bridge/SDK → Gateway → Orchestrator → Worker.

The envelope carries small routing facts (model, kind, max_tokens, deadline, ids)
by value and the request body either by value or, when it is large, as a Ray
``ObjectRef``: the body is put into the object store once at the edge, the Gateway
and the Orchestrator forward the reference without reading it, and only the Worker
resolves it. ``check_limits`` applies the operator's limits at the edge, where the
client can still be told exactly what was wrong.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from haif.exceptions import DeadlineExceeded, InvalidRequest, UnprocessableRequest
from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

if TYPE_CHECKING:
    from haif.config import LimitsConfig
    from haif.store.quotas import QuotaLimits

Kind = Literal["completion", "chat", "embedding"]
Body = CompletionRequest | ChatCompletionRequest | EmbeddingRequest

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when well-formed, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


def traceparent_from(header: str | None) -> str | None:
    """A W3C traceparent header when well-formed (invalid ones are ignored, per the spec)."""
    if not header:
        return None
    value = header.strip().lower()
    if not _TRACEPARENT.match(value):
        return None
    version, trace_id, parent_id, _ = value.split("-")
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return value


TIMEOUT_HEADER = "X-Request-Timeout"


def timeout_from(header: str | None, default_s: float, min_s: float, max_s: float) -> float:
    """The deadline a client asks for in ``X-Request-Timeout`` (seconds), else the default.

    Raises:
        InvalidRequest: not a number, or outside [min_s, max_s] (the message gives the bounds).
    """
    if header is None or not header.strip():
        return default_s
    try:
        value = float(header.strip())
    except ValueError:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds") from None
    if not min_s <= value <= max_s:  # also refuses nan and inf
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be between {min_s:g} and {max_s:g} seconds")
    return value


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, as established by the Gateway."""

    tenant: str
    scopes: frozenset[str] = frozenset({"inference"})
    allowed_models: frozenset[str] | None = None  # None: every model
    tenant_id: int | None = None  # None: no metadata store (auth.backend static)
    token_id: int | None = None
    limits: QuotaLimits | None = None  # as cached with the token


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    deadline: float  # wall-clock seconds (time.time()), comparable across processes
    api_key: str | None = field(default=None, repr=False)
    traceparent: str | None = None
    principal: Principal | None = None
    idempotency_key: str | None = None  # as the client sent it; the Gateway validates it
    sent_at: float | None = None  # time.time() of the last hop's hand-off (queue-wait spans)

    @classmethod
    def new(
        cls,
        *,
        timeout_s: float,
        api_key: str | None,
        request_id: str | None = None,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
    ) -> RequestContext:
        return cls(
            request_id=request_id_from(request_id),
            deadline=time.time() + timeout_s,
            api_key=api_key,
            traceparent=traceparent_from(traceparent),
            idempotency_key=idempotency_key,
        )

    def remaining_s(self) -> float:
        """Seconds left before the deadline.

        Raises:
            DeadlineExceeded: none are left.
        """
        left = self.deadline - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"request {self.request_id} passed its deadline")
        return left

    def authenticated(self, principal: Principal) -> RequestContext:
        """A copy that carries ``principal`` and no longer carries the secret key."""
        return replace(self, principal=principal, api_key=None)


@dataclass(frozen=True)
class WorkItem:
    kind: Kind
    model: str
    stream: bool
    max_tokens: int
    n_inputs: int
    payload_bytes: int
    body: Any  # a Body, or an ObjectRef to one
    ctx: RequestContext
    include_usage: bool = False
    n_choices: int = 1  # `n`: choices per prompt of a generation

    @property
    def by_reference(self) -> bool:
        return not isinstance(self.body, (CompletionRequest, ChatCompletionRequest, EmbeddingRequest))

    def with_ctx(self, ctx: RequestContext) -> WorkItem:
        return replace(self, ctx=ctx)


def payload_bytes(body: Body) -> int:
    """Approximate size of the text a body carries (UTF-8 bytes of prompts/inputs)."""
    if isinstance(body, CompletionRequest):
        texts = body.prompts()
    elif isinstance(body, ChatCompletionRequest):
        texts = [m.text() for m in body.messages]
    else:
        texts = body.inputs()
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def check_limits(body: Body, limits: LimitsConfig) -> int:
    """Apply the operator's limits; return the effective ``max_tokens`` (0 for embeddings).

    Raises:
        UnprocessableRequest: a limit is exceeded (the message names it).
        InvalidRequest: the combination of fields is not supported.
    """
    if isinstance(body, EmbeddingRequest):
        n = len(body.inputs())
        if n > limits.max_embedding_inputs:
            raise UnprocessableRequest(
                f"'input' has {n} items; the limit is {limits.max_embedding_inputs}"
            )
        return 0
    if body.n > limits.max_choices:
        raise UnprocessableRequest(f"'n' is {body.n}; the limit is {limits.max_choices}")
    stops = body.stop_list()
    if len(stops) > limits.max_stop_sequences:
        raise UnprocessableRequest(
            f"'stop' has {len(stops)} sequences; the limit is {limits.max_stop_sequences}"
        )
    if isinstance(body, CompletionRequest):
        requested = body.max_tokens
        n = len(body.prompts())
        if n > limits.max_prompts_per_request:
            raise UnprocessableRequest(
                f"'prompt' has {n} items; the limit is {limits.max_prompts_per_request}"
            )
        if body.stream and n > 1:
            raise InvalidRequest("streaming supports a single prompt per request")
    else:
        requested = body.requested_max_tokens()
    max_tokens = limits.default_max_tokens if requested is None else requested
    if max_tokens > limits.max_tokens:
        raise UnprocessableRequest(
            f"'max_tokens' is {max_tokens}; the limit is {limits.max_tokens}"
        )
    return max_tokens


def build_work_item(
    kind: Kind,
    body: Body,
    ctx: RequestContext,
    limits: LimitsConfig,
    put: Any | None = None,
) -> WorkItem:
    """Check limits and wrap ``body``; bodies over the threshold go to the object store.

    Args:
        put: the function that stores an object and returns its reference
            (``ray.put``); passed in so that this module does not import Ray.
    """
    max_tokens = check_limits(body, limits)
    size = payload_bytes(body)
    stored: Any = body
    if put is not None and size >= limits.object_ref_threshold_bytes:
        stored = put(body)
    n_inputs = (
        len(body.inputs()) if isinstance(body, EmbeddingRequest)
        else len(body.prompts()) if isinstance(body, CompletionRequest)
        else 1
    )
    return WorkItem(
        kind=kind,
        model=body.model,
        stream=bool(getattr(body, "stream", False)),
        max_tokens=max_tokens,
        n_inputs=n_inputs,
        payload_bytes=size,
        body=stored,
        ctx=ctx,
        include_usage=False if isinstance(body, EmbeddingRequest) else body.include_usage(),
        n_choices=1 if isinstance(body, EmbeddingRequest) else body.n,
    )


@dataclass(frozen=True)
class EmbeddingResult:
    """What a worker returns for an embeddings request.

    ``vectors`` is a float32 array of shape (n, dim), or an ObjectRef to one when it is
    large: it then crosses the Orchestrator and the Gateway unread and is fetched only
    by the edge that writes the response.
    """

    model: str
    vectors: Any
    prompt_tokens: int


@dataclass(frozen=True)
class Dispatched:
    """Where the Orchestrator ran a request: sent back with the result (first on a stream).

    The Gateway writes ``worker``, ``region`` and ``attempts`` into the job record.
    """

    worker: str
    region: str
    attempts: int
    value: Any = None  # the result (unary calls); a stream's first event, if any
