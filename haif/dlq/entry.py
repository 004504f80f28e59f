"""A dead letter: one job that failed finally, with what it takes to submit it again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from haif.exceptions import HaifError, InvalidRequest

if TYPE_CHECKING:
    from haif.envelope import Body, RequestContext

Kind = Literal["completion", "chat", "embedding"]
MAX_ERROR_CHARS = 1000


class DeadLetter(BaseModel):
    """The same fields in both backends: a Redis stream entry's JSON, a ``dead_letters`` row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(..., min_length=1, max_length=64, description="The job id; the entry's id too.")
    tenant_id: int
    tenant: str
    model: str
    kind: Kind
    error_type: str = Field(..., description="Class of the final error, e.g. DeadlineExceeded.")
    error_code: str = Field(..., description="Its OpenAI error code, e.g. timeout.")
    error: str = Field(..., max_length=MAX_ERROR_CHARS)
    attempts: int = Field(1, ge=1)
    trace_id: str | None = None
    traceparent: str | None = None
    request_id: str
    idempotency_key: str | None = None
    created_at: datetime = Field(..., description="When the job was admitted.")
    dead_at: datetime = Field(..., description="When it was dead-lettered.")
    body: str = Field(..., description="The request body as JSON (fields the client set).")
    body_truncated: bool = Field(False, description="The body was over dlq.max_body_bytes.")

    def request(self) -> Body:
        """The request body to submit again.

        Raises:
            InvalidRequest: the body was truncated when stored, or does not parse.
        """
        from pydantic import ValidationError

        from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

        if self.body_truncated:
            raise InvalidRequest(
                f"dead letter {self.id}: its body was truncated when stored; it cannot be replayed"
            )
        model = {
            "completion": CompletionRequest,
            "chat": ChatCompletionRequest,
            "embedding": EmbeddingRequest,
        }[self.kind]
        try:
            return model.model_validate_json(self.body)
        except ValidationError:
            raise InvalidRequest(f"dead letter {self.id}: its stored body does not parse") from None

    def summary(self) -> dict[str, Any]:
        """The entry without its body (what ``haif dlq list`` shows)."""
        return self.model_dump(mode="json", exclude={"body"})


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (``00-<trace id>-<parent id>-<flags>``)."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else None


def body_json(body: Body, max_bytes: int) -> tuple[str, bool]:
    """The body as stored: JSON of the fields the client set, cut at ``max_bytes``."""
    raw = body.model_dump_json(exclude_unset=True).encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return raw.decode("utf-8", "surrogatepass"), False
    return raw[:max_bytes].decode("utf-8", "ignore"), True


def dead_letter(
    *,
    job_id: str,
    ctx: RequestContext,
    kind: Kind,
    model: str,
    exc: BaseException,
    attempts: int,
    body: Body | None,
    created_at: datetime,
    max_body_bytes: int,
) -> DeadLetter:
    """The entry of a job whose dispatch ended with ``exc`` (the context holds the principal).

    ``body`` None: it could not be read (the entry is kept, marked not replayable).
    """
    principal = ctx.principal
    if principal is None or principal.tenant_id is None:
        raise ValueError("a dead letter needs an authenticated request with a tenant")
    text, truncated = body_json(body, max_body_bytes) if body is not None else ("", True)
    is_haif = isinstance(exc, HaifError)
    return DeadLetter(
        id=job_id,
        tenant_id=principal.tenant_id,
        tenant=principal.tenant,
        model=model,
        kind=kind,
        error_type=type(exc).__name__,
        error_code=exc.code if is_haif else "internal_error",
        error=(exc.message if is_haif else type(exc).__name__)[:MAX_ERROR_CHARS],
        attempts=max(1, attempts),
        trace_id=trace_id_of(ctx.traceparent),
        traceparent=ctx.traceparent,
        request_id=ctx.request_id,
        idempotency_key=ctx.idempotency_key,
        created_at=created_at,
        dead_at=datetime.now(UTC),
        body=text,
        body_truncated=truncated,
    )
