"""``haif dlq replay``: a dead letter submitted again, as its tenant, under its Idempotency-Key.

In-cluster callers are trusted (they reach the Gateway through a Serve handle, not
HTTP), so a replay carries no API key: the entry's tenant is looked up by id and
admitted with its current limits. The request keeps its original Idempotency-Key, or
gets one made from the job id, so that replaying the same entry twice executes it once.
A streamed request is replayed as a plain one: no client is there to read a stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from haif.dlq import DeadLetter
from haif.envelope import Principal, RequestContext, build_work_item
from haif.exceptions import InvalidRequest, NotFound

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.envelope import WorkItem
    from haif.store.db import Database

REPLAY_KEY_PREFIX = "dlq-replay-"


def replay_key(entry: DeadLetter) -> str:
    return entry.idempotency_key or f"{REPLAY_KEY_PREFIX}{entry.id}"


async def replay_item(
    config: HaifConfig, db: Database | None, entry: DeadLetter | dict[str, Any]
) -> tuple[WorkItem, Principal]:
    """The work item and principal that submit ``entry`` again.

    Raises:
        InvalidRequest: no metadata store, or the entry cannot be replayed (truncated body).
        NotFound: its tenant no longer exists.
    """
    from haif.store.tenants import tenant_limits

    if db is None:
        raise InvalidRequest(
            "replaying dead letters needs the metadata store (auth.backend: database)"
        )
    if not isinstance(entry, DeadLetter):
        entry = DeadLetter.model_validate(entry)
    body = entry.request()
    if getattr(body, "stream", False):
        body = body.model_copy(update={"stream": False, "stream_options": None})
    found = await db.run(_read, db, tenant_limits, entry.tenant_id)
    if found is None or found[0] != entry.tenant:
        raise NotFound(f"the tenant {entry.tenant!r} of dead letter {entry.id} no longer exists")
    principal = Principal(
        tenant=entry.tenant,
        scopes=frozenset({"inference"}),
        tenant_id=entry.tenant_id,
        limits=found[1],
    )
    ctx = RequestContext.new(
        timeout_s=config.server.request_timeout_s,
        api_key=None,
        idempotency_key=replay_key(entry),
    )
    return build_work_item(entry.kind, body, ctx, config.limits), principal


def _read(db: Database, fn: Any, *args: Any) -> Any:
    with db.connect() as conn:
        return fn(conn, *args)
