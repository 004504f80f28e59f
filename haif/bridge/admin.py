"""The admin API's side of a Gateway replica: who calls (the ``admin`` or ``tenant_admin``
scope, of a HAIF key or a JWT), an :class:`~haif.admin.service.AdminService` for them with
this replica's live view, the call on the database threads, and, after a change to what
authenticates, the notice to every replica.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, StreamingResponse

from haif.admin.audit import Actor
from haif.admin.operations import MAX_PAGE
from haif.exceptions import PermissionDenied, UnsupportedOperation

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from datetime import datetime

    from fastapi import Request

    from haif.admin.service import AdminService
    from haif.bridge.serving import BridgeService
    from haif.envelope import Principal

logger = logging.getLogger("haif.bridge")

ROLES = ("admin", "tenant_admin")


def role_of(principal: Principal) -> str:
    """Raises: PermissionDenied (neither admin scope)."""
    for role in ROLES:
        if role in principal.scopes:
            return role
    raise PermissionDenied("the admin API needs the admin or tenant_admin scope")


class AdminBridge:
    """Runs admin operations for the callers of one Gateway replica."""

    def __init__(self, bridge: BridgeService) -> None:
        self._bridge = bridge

    async def actor(self, request: Request) -> Actor:
        pipeline = self._bridge.pipeline
        pipeline.start()
        ctx = self._bridge.context(request)
        principal = await pipeline.admission.authenticate(ctx, scope=None)
        role = role_of(principal)
        name = principal.caller or f"dev-key:{principal.tenant}"
        client = request.client.host if request.client is not None else None
        return Actor(name=name, role=role, tenant=principal.tenant, request_id=ctx.request_id, client=client)  # type: ignore[arg-type]

    def service(self, actor: Actor) -> AdminService:
        from haif.admin.service import AdminService
        from haif.orchestrator.table import RoutingTable

        parts = self._bridge.pipeline.parts
        if parts.db is None:
            raise UnsupportedOperation("the admin API needs the metadata store (auth.backend: database)")
        table = parts.table

        def live() -> RoutingTable:
            return (table.table if table is not None else None) or RoutingTable()

        return AdminService(parts.db, self._bridge.config, actor, dlq=parts.dlq, live=live)

    async def run(self, request: Request, call: Callable[[AdminService], Any]) -> Any:
        """``call`` on an AdminService for the caller, on the database threads; its answer.
        A change to what authenticates reaches every Gateway replica before this returns."""
        service = self.service(await self.actor(request))
        result = await self._bridge.pipeline.parts.db.run(call, service)
        if service.auth_epoch is not None:
            await self._bridge.pipeline.auth_changed()
        return result

    async def answer(self, request: Request, call: Callable[[AdminService], Any], status_code: int = 200) -> JSONResponse:
        return JSONResponse(await self.run(request, call), status_code=status_code)

    async def usage_ndjson(
        self, request: Request, tenant: str | None, since: datetime | None, cursor: str | None
    ) -> StreamingResponse:
        """Every usage record from ``cursor`` on, one JSON object per line, read a page at a
        time (a refusal is answered before the stream starts)."""
        service = self.service(await self.actor(request))
        first = await self._bridge.pipeline.parts.db.run(service.list_usage, tenant, since, cursor, MAX_PAGE)

        async def lines() -> AsyncIterator[bytes]:
            page = first
            while True:
                for row in page["data"]:
                    yield (json.dumps(row) + "\n").encode()
                if page["next_cursor"] is None:
                    return
                page = await self._bridge.pipeline.parts.db.run(
                    service.list_usage, tenant, since, page["next_cursor"], MAX_PAGE
                )

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def replay(self, request: Request, entry_id: str, keep: bool) -> JSONResponse:
        """A dead letter submitted again through this replica's pipeline (its tenant, its
        original Idempotency-Key: twice executes once)."""
        service = self.service(await self.actor(request))
        db = self._bridge.pipeline.parts.db
        entry = await db.run(service.get_dead_letter, entry_id)
        result = await self._bridge.pipeline.replay_dead_letter(entry)
        return JSONResponse(await db.run(service.replayed, entry_id, result, keep))
