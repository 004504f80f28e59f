"""Gateway admission on the embedded store: a fake clock, a tenant and its token, a work item."""

from __future__ import annotations

from haif.config import HaifConfig
from haif.envelope import RequestContext, build_work_item
from haif.gateway.admission import Admission
from haif.gateway.auth import DatabaseAuthenticator
from haif.gateway.quota import QuotaGate
from haif.gateway.serving import completion_response
from haif.protocol import CompletionRequest, CompletionResponse
from haif.runtimes.base import GenerationOutput
from haif.store import Database
from haif.store.quotas import QuotaLimits
from haif.store.tenants import TenantRepository
from haif.store.tokens import TokenRepository


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_tenant(
    db: Database, name: str, limits: QuotaLimits | None = None, **token_kw: object
) -> tuple[int, str]:
    with db.session() as s:
        tenant = TenantRepository(s).create(name, limits)
        row, token = TokenRepository(s).create(tenant, **token_kw)
        return tenant.id, token


def admission(
    config: HaifConfig, db: Database, clock: Clock | None = None, ttl_s: float = 5.0
) -> Admission:
    auth = DatabaseAuthenticator(db, ttl_s=ttl_s, max_entries=100, clock=clock or Clock())
    return Admission(config, auth, db=db, quotas=QuotaGate(db, None))


def item(
    config: HaifConfig,
    key: str | None,
    *,
    prompt: str = "one two three",
    stream: bool = False,
    idem: str | None = None,
    model: str = "echo",
    max_tokens: int = 4,
):
    body = CompletionRequest(model=model, prompt=prompt, max_tokens=max_tokens, stream=stream)
    ctx = RequestContext.new(timeout_s=10, api_key=key, idempotency_key=idem)
    return build_work_item("completion", body, ctx, config.limits)


def answer(model: str, job_id: str) -> CompletionResponse:
    return completion_response(model, [GenerationOutput("one two ", 3, 2, "length")], job_id)
