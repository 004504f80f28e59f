"""``/admin/v1/``: the operator's HTTP API (scope ``admin``; ``tenant_admin`` for its own
tenant's tokens, jobs and usage). Every route runs one operation of
:class:`~haif.admin.operations.Operations`; lists answer ``{"data", "next_cursor"}``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from haif.admin.operations import DEFAULT_PAGE, MAX_PAGE
from haif.bridge.admin import AdminBridge
from haif.bridge.routers.common import ERROR_RESPONSES, service
from haif.bridge.serving import utc

router = APIRouter(prefix="/admin/v1", tags=["admin"], responses=ERROR_RESPONSES)

# Every text an operator sends: printable, no control characters (a NUL cannot be stored
# in PostgreSQL, and no name HAIF gives contains one): anything else is a 422 here.
TEXT = r"^[^\x00-\x1f\x7f]*$"
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page.")]
Cursor = Annotated[str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_=-]*$",
                                     description="next_cursor of the page before.")]
TenantName = Annotated[str, Path(min_length=1, max_length=64, pattern=TEXT)]
TenantFilter = Annotated[str | None, Query(min_length=1, max_length=64, pattern=TEXT, description="Only this tenant's.")]
ModelName = Annotated[str, Path(min_length=1, max_length=128, pattern=TEXT)]
Filter = Annotated[str | None, Query(max_length=600, pattern=TEXT)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT)]
Since = Annotated[datetime | None, Query(description="ISO 8601: at or after.")]
QuotaValue = Annotated[int | None, Field(ge=0, le=2**63 - 1)]
Priority = Literal["high", "normal", "low"]
Scope = Literal["inference", "admin", "tenant_admin"]


class Page(BaseModel):
    data: list[dict[str, Any]]
    next_cursor: str | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(_Body):
    name: Name
    requests_per_minute: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    tokens_per_minute: QuotaValue = None
    tokens_per_day: QuotaValue = None
    max_concurrent: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    priority: Priority | None = None


class TenantUpdate(_Body):
    requests_per_minute: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    tokens_per_minute: QuotaValue = None
    tokens_per_day: QuotaValue = None
    max_concurrent: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    priority: Priority | None = None
    suspended: bool | None = None


class TokenCreate(_Body):
    tenant: Name
    scopes: list[Scope] | None = Field(None, max_length=3)
    models: list[Annotated[str, Field(min_length=1, max_length=256, pattern=TEXT)]] | None = Field(None, max_length=256)
    expires_in_s: float | None = Field(None, ge=1, le=10 * 365 * 86400)
    name: str | None = Field(None, max_length=128, pattern=TEXT)


class RolloutSet(_Body):
    version: str = Field(min_length=1, max_length=64, pattern=TEXT)
    weight: int = Field(ge=0, le=100)


class PeerAdd(_Body):
    public_key: str = Field(min_length=64, max_length=64, pattern="^[0-9a-fA-F]{64}$")
    tenant: Name


def _admin(request: Request) -> AdminBridge:
    return AdminBridge(service(request))


def _given(body: BaseModel) -> dict[str, Any]:
    """The fields the body names (``null`` included: a limit set to unlimited)."""
    return {k: getattr(body, k) for k in body.model_fields_set}


# --- tenants ---------------------------------------------------------------------------------


@router.get("/tenants", response_model=Page, summary="Tenants with their quotas")
async def list_tenants(request: Request, cursor: Cursor = None, limit: Limit = DEFAULT_PAGE,
                       suspended: bool | None = None) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_tenants(cursor, limit, suspended))


@router.post("/tenants", status_code=201, summary="Create a tenant (limits not given: unlimited)")
async def create_tenant(request: Request, body: TenantCreate) -> Response:
    limits = {k: v for k, v in _given(body).items() if k not in ("name", "priority")}
    return await _admin(request).answer(
        request, lambda s: s.create_tenant(body.name, limits, body.priority), status_code=201
    )


@router.get("/tenants/{name}", summary="One tenant")
async def get_tenant(request: Request, name: TenantName) -> Response:
    return await _admin(request).answer(request, lambda s: s.get_tenant(name))


@router.patch("/tenants/{name}", summary="Change quotas, priority, or suspend / resume")
async def update_tenant(request: Request, name: TenantName, body: TenantUpdate) -> Response:
    changes = _given(body)
    for key in ("priority", "suspended"):
        if key in changes and changes[key] is None:
            del changes[key]
    return await _admin(request).answer(request, lambda s: s.update_tenant(name, changes))


# --- tokens ----------------------------------------------------------------------------------


@router.get("/tokens", response_model=Page, summary="Tokens: ids and prefixes, never secrets")
async def list_tokens(request: Request, tenant: TenantFilter = None,
                      state: Literal["active", "expired", "revoked"] | None = None,
                      cursor: Cursor = None, limit: Limit = DEFAULT_PAGE) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_tokens(tenant, state, cursor, limit))


@router.post("/tokens", status_code=201, summary="Create a token; the answer holds its secret, this once")
async def create_token(request: Request, body: TokenCreate) -> Response:
    return await _admin(request).answer(
        request,
        lambda s: s.create_token(body.tenant, body.scopes, body.models, body.expires_in_s, body.name),
        status_code=201,
    )


@router.delete("/tokens/{token_id}", summary="Revoke a token (by id or prefix): refused everywhere at once")
async def revoke_token(request: Request, token_id: Annotated[str, Path(min_length=1, max_length=64, pattern=TEXT)]) -> Response:
    return await _admin(request).answer(request, lambda s: s.revoke_token(token_id, secret_ok=False))


# --- models, rollouts, workers ---------------------------------------------------------------


@router.get("/models", response_model=Page, summary="Served models: versions, weights, workers by state")
async def list_models(request: Request) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_models())


@router.get("/rollouts", response_model=Page, summary="Every model's rollout")
async def list_rollouts(request: Request) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_rollouts())


@router.get("/rollouts/{model}", summary="A model's rollout")
async def get_rollout(request: Request, model: ModelName) -> Response:
    return await _admin(request).answer(request, lambda s: s.get_rollout(model))


@router.put("/rollouts/{model}", summary="A canary version beside the stable one, with its weight")
async def set_rollout(request: Request, model: ModelName, body: RolloutSet) -> Response:
    return await _admin(request).answer(request, lambda s: s.set_rollout(model, body.version, body.weight))


@router.post("/rollouts/{model}/promote", summary="The (ready) canary becomes the stable version")
async def promote(request: Request, model: ModelName) -> Response:
    return await _admin(request).answer(request, lambda s: s.promote(model))


@router.post("/rollouts/{model}/rollback", summary="Back to the stable version; the canary drains")
async def rollback(request: Request, model: ModelName) -> Response:
    return await _admin(request).answer(request, lambda s: s.rollback(model))


@router.get("/workers", response_model=Page, summary="Workers as this Gateway routes to them")
async def list_workers(request: Request, model: Filter = None, state: Filter = None,
                       cursor: Cursor = None, limit: Limit = DEFAULT_PAGE) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_workers(model, state, cursor, limit))


@router.post("/workers/{worker_id:path}/drain", status_code=202,
             summary="Drain a worker: no new requests, it finishes its own, then stops")
async def drain_worker(request: Request,
                       worker_id: Annotated[str, Path(min_length=1, max_length=256, pattern=TEXT)]) -> Response:
    return await _admin(request).answer(request, lambda s: s.drain_worker(worker_id), status_code=202)


# --- dead letters ----------------------------------------------------------------------------

EntryId = Annotated[str, Path(min_length=1, max_length=64, pattern=TEXT)]


@router.get("/dlq", response_model=Page, summary="Dead letters, newest first (without bodies)")
async def list_dead_letters(request: Request, tenant: TenantFilter = None, model: Filter = None,
                            cursor: Cursor = None, limit: Limit = DEFAULT_PAGE) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_dead_letters(tenant, model, cursor, limit))


@router.delete("/dlq", summary="Purge every dead letter")
async def purge_dead_letters(request: Request) -> Response:
    return await _admin(request).answer(request, lambda s: s.purge_dead_letters())


@router.get("/dlq/{entry_id}", summary="One dead letter, body included")
async def get_dead_letter(request: Request, entry_id: EntryId) -> Response:
    return await _admin(request).answer(request, lambda s: s.get_dead_letter(entry_id))


@router.delete("/dlq/{entry_id}", summary="Purge one dead letter")
async def purge_dead_letter(request: Request, entry_id: EntryId) -> Response:
    return await _admin(request).answer(request, lambda s: s.purge_dead_letter(entry_id))


@router.post("/dlq/{entry_id}/replay", summary="Run a dead letter again (its tenant, its Idempotency-Key)")
async def replay_dead_letter(request: Request, entry_id: EntryId, keep: bool = False) -> Response:
    return await _admin(request).replay(request, entry_id, keep)


# --- jobs, usage, peers, audit ---------------------------------------------------------------


@router.get("/jobs", response_model=Page, summary="Jobs of any tenant (tenant_admin: its own), newest first")
async def list_jobs(request: Request, tenant: TenantFilter = None, state: Filter = None, model: Filter = None,
                    cursor: Cursor = None, limit: Limit = DEFAULT_PAGE) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_jobs(tenant, state, model, cursor, limit))


@router.get(
    "/usage", response_model=Page,
    summary="Usage records, oldest first; `format=ndjson` streams every row (for export)",
)
async def list_usage(request: Request, tenant: TenantFilter = None, since: Since = None,
                     cursor: Cursor = None, limit: Limit = DEFAULT_PAGE,
                     format: Literal["json", "ndjson"] = "json") -> Response:  # noqa: A002
    since = utc(since)
    admin = _admin(request)
    if format == "json":
        return await admin.answer(request, lambda s: s.list_usage(tenant, since, cursor, limit))
    return await admin.usage_ndjson(request, tenant, since, cursor)


@router.get("/p2p/peers", response_model=Page, summary="P2P peers and their tenants")
async def list_peers(request: Request, tenant: TenantFilter = None, cursor: Cursor = None,
                     limit: Limit = DEFAULT_PAGE) -> Response:
    return await _admin(request).answer(request, lambda s: s.list_peers(tenant, cursor, limit))


@router.post("/p2p/peers", status_code=201, summary="Map a peer's public key to a tenant")
async def add_peer(request: Request, body: PeerAdd) -> Response:
    return await _admin(request).answer(request, lambda s: s.add_peer(body.public_key, body.tenant), status_code=201)


@router.delete("/p2p/peers/{key}", summary="Unmap a peer: refused everywhere at once")
async def remove_peer(request: Request, key: Annotated[str, Path(min_length=64, max_length=64,
                                                                 pattern="^[0-9a-fA-F]{64}$")]) -> Response:
    return await _admin(request).answer(request, lambda s: s.remove_peer(key))


@router.get("/audit", response_model=Page, summary="The audit log, newest first")
async def list_audit(request: Request, action: Filter = None, actor: Filter = None, target: Filter = None,
                     since: Since = None, cursor: Cursor = None, limit: Limit = DEFAULT_PAGE) -> Response:
    since = utc(since)
    return await _admin(request).answer(request, lambda s: s.list_audit(action, actor, target, since, cursor, limit))



