"""The request envelope that travels edge (HTTP, SDK, P2P) → Gateway → Worker.

The envelope carries small routing facts (model, kind, max_tokens, deadline, ids)
by value and the request body either by value or, when it is large, as a Ray
``ObjectRef``: the body is put into the object store once at the edge, the Gateway
forwards the reference without reading it, and only the Worker resolves it. ``check_limits`` applies the operator's limits at the edge, where the
client can still be told exactly what was wrong.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from haif.exceptions import (
    DeadlineExceeded,
    HaifError,
    InvalidRequest,
    UnprocessableRequest,
    UnsupportedParameter,
)
from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponseFormatText

if TYPE_CHECKING:
    from haif.config import LimitsConfig
    from haif.protocol import ToolMode
    from haif.store.quotas import QuotaLimits

Kind = Literal["completion", "chat", "embedding"]
Body = CompletionRequest | ChatCompletionRequest | EmbeddingRequest

# A client's X-Request-ID is kept only when it is short and made of characters that are
# inert in a header, a JSON log line and a span attribute: letters, digits and ``-_.:``
# (enough for UUIDs, ULIDs and ``service:123``-style ids). No spaces, quotes, ``,`` or
# ``;`` (they split header lists and log parsers), nothing outside ASCII.
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when well-formed, else a fresh one (32 hex characters).

    Well-formed: 1 to ``MAX_REQUEST_ID_CHARS`` characters of letters, digits and ``-_.:``.
    A malformed id is replaced, never refused: the request goes on under the fresh id.
    """
    if header and _REQUEST_ID.fullmatch(header):
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
    # A JWT of an issuer in auth.oidc: who signed it and whom it names (jobs name the caller).
    issuer: str | None = None
    subject: str | None = None

    @property
    def caller(self) -> str | None:
        """Who acts, as jobs and audit rows name them: ``token:ID`` or ``oidc:ISSUER#SUB``."""
        if self.subject is not None:
            return f"oidc:{self.issuer}#{self.subject}"
        return None if self.token_id is None else f"token:{self.token_id}"


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    deadline: float  # wall-clock seconds (time.time()), comparable across processes
    api_key: str | None = field(default=None, repr=False)
    traceparent: str | None = None
    principal: Principal | None = None
    idempotency_key: str | None = None  # as the client sent it; the Gateway validates it
    sent_at: float | None = None  # time.time() of the last hop's hand-off (queue-wait spans)
    # A P2P caller's Noise public key, verified by the shim's handshake (set by it alone):
    # the Gateway authenticates the peer by it instead of an API key.
    peer_key: str | None = None

    @classmethod
    def new(
        cls,
        *,
        timeout_s: float,
        api_key: str | None,
        request_id: str | None = None,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
        peer_key: str | None = None,
    ) -> RequestContext:
        return cls(
            request_id=request_id_from(request_id),
            deadline=time.time() + timeout_s,
            api_key=api_key,
            traceparent=traceparent_from(traceparent),
            idempotency_key=idempotency_key,
            peer_key=peer_key,
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
class Shaping:
    """What the Gateway needs to shape the answer besides the worker's outputs (it never reads
    a body that travels by reference): whether logprobs go in it, and how tool calls are
    read from the generated text (``haif.gateway.serving``)."""

    logprobs: bool = False
    tool_mode: ToolMode = "none"
    tool_name: str | None = None  # the function a named tool_choice forces
    parallel_tool_calls: bool = True

    @classmethod
    def of(cls, body: Body) -> Shaping:
        if isinstance(body, EmbeddingRequest):
            return cls()
        logprobs = body.logprobs_count() is not None
        if isinstance(body, CompletionRequest):
            return cls(logprobs=logprobs)
        mode, name = body.tool_mode()
        return cls(logprobs, mode, name, body.parallel_tool_calls)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter a request runs through: its served name and its signed artifact."""

    name: str  # a configured adapter's name, or the artifact ref of one served on demand
    artifact: str  # `name:version` or `sha256:<manifest digest>`


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's ``model`` names, resolved once, at admission (``ModelCatalog.resolve``),
    and carried with the request from then on: the Gateway's answers, its job and usage
    records, the router and the worker all read it, none resolves the name again.

    ``served`` is the name every answer carries in ``model`` (plain, streamed, SDK, P2P):
    the base, or ``BASE:ADAPTER`` however the adapter was named in the request.
    """

    requested: str  # as the client sent it: a model, `BASE:ADAPTER`, an adapter's own name
    base: str  # the configured model that runs it
    adapter: Adapter | None = None
    version: str | None = None  # of the base: the traffic split's pick once admitted

    @property
    def served(self) -> str:
        return self.base if self.adapter is None else f"{self.base}:{self.adapter.name}"

    def at(self, version: str) -> ResolvedModel:
        """The same resolution, on ``version`` of the base (the traffic split's pick)."""
        return replace(self, version=version)


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
    shaping: Shaping = field(default_factory=Shaping)
    user: str | None = None  # the request's `user`, recorded on its job
    # Set by admission, once: what `model` names (the base, the adapter, the version the
    # traffic split gave it). Before admission, or outside a Gateway (a P2P worker's item),
    # None: `model` is then the model itself.
    resolved: ResolvedModel | None = None

    @property
    def base(self) -> str:
        """The model that runs it: the resolved base, else ``model`` as sent."""
        return self.model if self.resolved is None else self.resolved.base

    @property
    def adapter(self) -> Adapter | None:
        return None if self.resolved is None else self.resolved.adapter

    @property
    def version(self) -> str | None:
        """The model version the router sends it to (a rollout's canary or the stable one)."""
        return None if self.resolved is None else self.resolved.version

    @property
    def served_model(self) -> str:
        """What the client is served, as every answer names it: the model, or ``BASE:ADAPTER``."""
        return self.model if self.resolved is None else self.resolved.served

    @property
    def by_reference(self) -> bool:
        return not isinstance(self.body, (CompletionRequest, ChatCompletionRequest, EmbeddingRequest))

    def with_ctx(self, ctx: RequestContext) -> WorkItem:
        return replace(self, ctx=ctx)


# A prompt given as token ids counts this many bytes a token (the quota's default estimate).
TOKEN_ID_BYTES = 4


def payload_bytes(body: Body) -> int:
    """Approximate size of the text a body carries (UTF-8 bytes of prompts/inputs, of the
    tools and tool calls a chat template renders; token ids at ``TOKEN_ID_BYTES`` each)."""
    if isinstance(body, CompletionRequest):
        texts = body.prompts()
    elif isinstance(body, ChatCompletionRequest):
        texts = [m.text() for m in body.messages]
        texts += [c.function.name + c.function.arguments for m in body.messages for c in m.tool_calls or ()]
        texts += [t.function.model_dump_json(exclude_none=True) for t in body.tools or ()]
    else:
        texts = body.inputs()
    return sum(
        len(t.encode("utf-8", "surrogatepass")) if isinstance(t, str) else TOKEN_ID_BYTES * len(t)
        for t in texts
    )


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
    unsupported = body.unsupported()
    if unsupported:
        raise UnsupportedParameter(
            f"model {body.model!r} is a text model; not supported: {', '.join(unsupported)}"
        )
    _check_generation_options(body, limits)
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
    if body.min_tokens > max_tokens:
        raise InvalidRequest(f"'min_tokens' ({body.min_tokens}) exceeds 'max_tokens' ({max_tokens})")
    return max_tokens


def _check_generation_options(body: CompletionRequest | ChatCompletionRequest, limits: LimitsConfig) -> None:
    """The combinations of logprobs, tools and response_format that make sense."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true")
        name = "top_logprobs"
        mode, _ = body.tool_mode()
        constrained = body.response_format is not None and not isinstance(body.response_format, ResponseFormatText)
        if constrained and mode in ("required", "named"):
            raise InvalidRequest(
                "'response_format' cannot be combined with a 'tool_choice' that forces a tool call"
            )
    else:
        name = "logprobs"
    count = body.logprobs_count()
    if count is not None and count > limits.max_logprobs:
        raise UnprocessableRequest(f"'{name}' is {count}; the limit is {limits.max_logprobs}")


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
        shaping=Shaping.of(body),
        user=body.user,
    )


@dataclass(frozen=True)
class EmbeddingResult:
    """What a worker returns for an embeddings request.

    ``vectors`` is a float32 array of shape (n, dim), or an ObjectRef to one when it is
    large: it then crosses the Gateway unread and is fetched only by the edge that
    writes the response.
    """

    model: str
    vectors: Any
    prompt_tokens: int


@dataclass(frozen=True)
class Refused:
    """A HAIF error that a Gateway handle method answers instead of raising it.

    Serve logs every exception a replica method raises as an ERROR with its traceback;
    a refused request (a bad key, an unknown model) is not a failure of the platform.
    The SDK raises ``error`` on the caller's side (``haif.sdk``); on a stream it is the
    last item.
    """

    error: HaifError


@dataclass(frozen=True)
class Dispatched:
    """Where the router ran a request: sent back with the result (first on a stream).

    The Gateway writes ``worker``, ``region``, ``version`` and ``attempts`` into the job
    record; ``version`` is the response's ``system_fingerprint``.
    """

    worker: str
    region: str
    attempts: int
    value: Any = None  # the result (unary calls); a stream's first event, if any
    version: str | None = None  # the model version of the worker that ran it
