"""Admission: who is asking, may they, is there quota, has this request run before.

One ``Admission`` per Gateway replica. ``admit`` authenticates, checks scope and
model, validates the Idempotency-Key, then reserves quota and records the job in one
transaction (``QuotaGate.reserve``). It returns a ``Ticket``: the request to dispatch,
or the stored response of an earlier execution to replay. The Gateway settles the
ticket once the work is done or has failed; settlement is shielded from cancellation,
so a client that hangs up still gets its reservation settled, and it outlives a store
outage (``haif.gateway.settlement``). A job that fails finally (a service error after
the router's retries) is dead-lettered: its row ends ``dead_lettered`` and an
entry with its request goes to the DLQ, from where ``haif dlq replay`` submits it again
(``admit_trusted``, under its original Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from haif.exceptions import (
    AuthenticationFailed,
    Conflict,
    HaifError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    ServiceError,
    UnprocessableRequest,
    unwrap,
)
from haif.gateway import idempotency
from haif.gateway.catalog import ModelCatalog
from haif.gateway.metrics import GatewayMetrics
from haif.gateway.quota import reservation_tokens
from haif.protocol import new_id
from haif.store.ledger import Existing, JobRequest, Outcome, Reservation
from haif.store.models import OPEN_STATES, RETRYABLE_STATES, JobState
from haif.store.quotas import QuotaLimits
from haif.telemetry import logs, tracing

if TYPE_CHECKING:
    from collections.abc import Callable

    from haif.config import HaifConfig, ModelConfig
    from haif.dlq import DeadLetter
    from haif.envelope import Dispatched, Principal, RequestContext, ResolvedModel, WorkItem
    from haif.gateway.auth import Authenticator, PeerAuthenticator
    from haif.gateway.quota import QuotaGate
    from haif.gateway.settlement import Settlements
    from haif.gateway.upkeep import JobUpkeep
    from haif.store.db import Database

logger = logging.getLogger("haif.gateway")

_ID_PREFIX = {"completion": "cmpl", "chat": "chatcmpl", "embedding": "embd"}
MAX_ERROR_CHARS = 1000


@dataclass
class Ticket:
    """An admitted request: dispatch ``item`` (then settle), or answer ``replay``."""

    item: WorkItem
    job_id: str | None = None
    replay: Any = None
    reservation: Reservation | None = None
    key: tuple[int, str] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    settled: bool = False
    attempts: int = 1
    worker: str | None = None
    region: str | None = None
    version: str | None = None  # of the worker that ran it (None: the one admitted with)

    @property
    def served_version(self) -> str | None:
        """The version that ran it, or that it was routed to (None: no version, e.g. no table)."""
        return self.version or self.item.version

    def ran_on(self, dispatched: Dispatched) -> None:
        """Where the router ran it (and after how many tries), for the job record."""
        self.worker, self.region, self.attempts = dispatched.worker, dispatched.region, dispatched.attempts
        self.version = dispatched.version


class Admission:
    def __init__(
        self,
        config: HaifConfig,
        auth: Authenticator,
        *,
        db: Database | None = None,
        quotas: QuotaGate | None = None,
        upkeep: JobUpkeep | None = None,
        replica: str | None = None,
        metrics: GatewayMetrics | None = None,
        settlements: Settlements | None = None,
        peers: PeerAuthenticator | None = None,
        versions: Callable[[str, str | None], str] | None = None,
    ) -> None:
        self._config = config
        # (model, sticky key) -> the version the traffic split gives it: the router's table.
        self._versions = versions
        self.catalog = ModelCatalog(config)
        self._auth = auth
        self._peers = peers
        self._db = db
        self._quotas = quotas
        if settlements is None and quotas is not None and db is not None:
            from haif.dlq import DeadLetterQueue
            from haif.gateway.settlement import Settlements

            settlements = Settlements(quotas, db, DeadLetterQueue(config, db), config.jobs)
        self.settlements = settlements
        self._upkeep = upkeep
        self._replica = replica
        self._region = config.regions[0].name
        self.metrics = metrics or GatewayMetrics()
        # Idempotent executions in flight on this replica: duplicates here wait on them.
        self._local: dict[tuple[int, str], asyncio.Future[None]] = {}
        self._settling: set[asyncio.Future[None]] = (
            set()
        )  # settlements running after their response

    def _version_of(self, model: ModelConfig, item: WorkItem, idempotency_key: str | None) -> str:
        """The version ``item`` runs on: the same Idempotency-Key, else the same ``user``,
        gets the same version while the weights stay; others are weighted at random."""
        if self._versions is None:
            return model.version
        return self._versions(model.name, idempotency_key or item.user)

    # --- who -------------------------------------------------------------------------------

    async def authenticate(self, ctx: RequestContext, scope: str | None = "inference") -> Principal:
        with tracing.span("gateway.auth") as span:
            try:
                if ctx.peer_key is not None and ctx.api_key is None:  # a P2P caller by its Noise key
                    if self._peers is None:
                        raise AuthenticationFailed("P2P callers are not served here (p2p.enabled is off)")
                    principal = await self._peers.authenticate(ctx.peer_key)
                else:
                    principal = await self._auth.authenticate(ctx.api_key)
            except HaifError as exc:
                self.metrics.refused(exc)
                raise
            span.set_attribute(tracing.TENANT, principal.tenant)
            logs.set_tenant(principal.tenant)
            if scope is not None and scope not in principal.scopes:
                self.metrics.outcome("forbidden")
                raise PermissionDenied(f"this API key lacks the {scope!r} scope")
            return principal

    # --- admission ---------------------------------------------------------------------------

    async def admit(self, item: WorkItem) -> Ticket:
        """Raises: the 4xx of whatever refuses the request, StoreUnavailable, DeadlineExceeded."""
        try:
            principal = await self.authenticate(item.ctx)
            try:
                return await self._admit(item, principal)
            except HaifError as exc:
                self.metrics.refused(exc, principal)
                raise
        except BaseException as exc:
            self.metrics.finished(item.model, item.kind, exc)
            raise

    async def admit_trusted(self, item: WorkItem, principal: Principal) -> Ticket:
        """Admit for an in-cluster caller that has established ``principal`` itself (no API key).

        Raises: as ``admit``, but never AuthenticationFailed.
        """
        try:
            return await self._admit(item, principal)
        except HaifError as exc:
            self.metrics.refused(exc)
            raise

    async def _admit(self, item: WorkItem, principal: Principal) -> Ticket:
        # The one resolution of the request's `model`: it travels in `item.resolved` from here.
        resolved = self.catalog.resolve(item.model)
        if resolved is not None:
            tracing.set_attributes(_span_attributes(resolved))
        allowed = principal.allowed_models
        if resolved is None:  # unknown: a 404 for a token that may name it, else a 403
            permitted = allowed is None or item.model in allowed
        else:
            permitted = self.catalog.permits(allowed, resolved)
        if not permitted:
            raise PermissionDenied(f"this API key may not use model {item.model!r}")
        limits = self._config.limits
        if item.max_tokens > limits.max_tokens:
            raise UnprocessableRequest(
                f"'max_tokens' is {item.max_tokens}; the limit is {limits.max_tokens}"
            )
        if item.kind == "embedding" and item.n_inputs > limits.max_embedding_inputs:
            raise UnprocessableRequest(
                f"'input' has {item.n_inputs} items; the limit is {limits.max_embedding_inputs}"
            )
        if resolved is None:
            raise ModelNotFound(f"the model {item.model!r} does not exist")
        model = self.catalog.model(resolved)
        if model.kind != ("embed" if item.kind == "embedding" else "generate"):
            use = "/v1/embeddings" if model.kind == "embed" else "/v1/completions or /v1/chat/completions"
            raise UnprocessableRequest(f"model {item.model!r} does not support this endpoint; use {use}")
        ctx = item.ctx
        ctx.remaining_s()
        key, digest = await self._idempotency(item)
        resolved = resolved.at(self._version_of(model, item, ctx.idempotency_key))
        item = replace(item, ctx=ctx.authenticated(principal), resolved=resolved)
        if self._quotas is None or principal.tenant_id is None:
            self.metrics.outcome("admitted")
            return Ticket(item)  # no metadata store: nothing to reserve or record
        req = JobRequest(
            job_id=new_id(_ID_PREFIX[item.kind]),
            tenant_id=principal.tenant_id,
            token_id=principal.token_id,
            caller=principal.caller,
            kind=item.kind,
            model=resolved.served,  # BASE:ADAPTER: usage records carry the adapter
            version=resolved.version or model.version,
            tokens=reservation_tokens(item, self._config.quotas.prompt_bytes_per_token),
            limits=principal.limits or QuotaLimits(),
            count_requests=self._quotas.counts_requests_in_db,
            idempotency_key=key,
            request_hash=digest,
            gateway=self._replica,
            region=self._region,
            user=item.user,
        )
        while True:
            ctx.remaining_s()
            with tracing.span("gateway.quota", attributes={"haif.job_id": req.job_id}):
                result = await self._quotas.reserve(
                    principal, req, datetime.now(UTC), streamed=item.stream
                )
            if isinstance(result, Reservation):
                return self._ticket(item, result, key)
            replay = await self._replay(item, principal.tenant_id, key, result)
            if replay is not None:
                self.metrics.outcome("replayed")
                self.metrics.finished(item.base, item.kind, None)
                return Ticket(item, job_id=result.job_id, replay=replay)
            # The first execution failed: take its job over (one duplicate wins, the others wait).

    async def _idempotency(self, item: WorkItem) -> tuple[str | None, str | None]:
        key = item.ctx.idempotency_key
        if key is None:
            return None, None
        idempotency.check_key(key, self._config.jobs.max_idempotency_key_chars)
        if self._quotas is None:
            raise InvalidRequest(
                "Idempotency-Key needs the metadata store (auth.backend: database)"
            )
        if item.stream:
            raise InvalidRequest("Idempotency-Key is not supported with stream: true")
        body = await item.body if item.by_reference else item.body
        return key, idempotency.request_hash(item.kind, body)

    def _ticket(self, item: WorkItem, reservation: Reservation, key: str | None) -> Ticket:
        ticket = Ticket(item, job_id=reservation.job_id, reservation=reservation)
        if key is not None:
            ticket.key = (reservation.tenant_id, key)
            self._local[ticket.key] = asyncio.get_running_loop().create_future()
        if self._upkeep is not None:
            self._upkeep.started(reservation.job_id)
        self.metrics.outcome("admitted")
        return ticket

    async def _replay(
        self, item: WorkItem, tenant_id: int, key: str | None, existing: Existing
    ) -> Any:
        """The stored response of ``existing`` once it has closed; None when it failed."""
        if self._db is None or key is None:  # only keyed requests find an existing job
            raise Conflict("this request is a duplicate")
        state, response = existing.state, existing.response
        if state in OPEN_STATES:
            state, response = await idempotency.wait_for_job(
                self._db,
                existing.job_id,
                item.ctx.deadline,
                self._config.jobs.idempotency_poll_ms / 1000,
                self._local.get((tenant_id, key)),
            )
        if state in RETRYABLE_STATES:
            return None
        if state != JobState.SUCCEEDED.value or response is None:
            raise Conflict(
                f"the request with this Idempotency-Key ended {state} and cannot be replayed"
            )
        return idempotency.decode_response(item.kind, response)

    # --- settlement ----------------------------------------------------------------------------

    async def succeed(
        self,
        ticket: Ticket,
        prompt_tokens: int,
        completion_tokens: int,
        response: Any = None,
        vectors: Any = None,
    ) -> None:
        self.metrics.finished(
            ticket.item.base, ticket.item.kind, None, prompt_tokens, completion_tokens,
            ticket.served_version,
        )
        stored = None
        if ticket.key is not None and response is not None:
            stored = idempotency.encode_response(ticket.item.kind, response, vectors)
            if len(stored) > self._config.jobs.max_stored_response_bytes:
                logger.warning("job %s: response too large to keep for replays", ticket.job_id)
                stored = None
        await self._settle(
            ticket,
            Outcome(
                JobState.SUCCEEDED,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                started_at=ticket.started_at,
                finished_at=datetime.now(UTC),
                response=stored,
                bill=True,
                attempts=ticket.attempts,
                worker=ticket.worker,
                region=ticket.region,
                version=ticket.version,
            ),
        )

    async def fail(
        self, ticket: Ticket, exc: BaseException, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """Settle a failed or cancelled job; tokens a stream already delivered are billed.

        A service error (the platform's side, after the router's retries) is final:
        the job is dead-lettered. Client errors and a client that went away are not.
        """
        self.metrics.finished(
            ticket.item.base, ticket.item.kind, exc, prompt_tokens, completion_tokens,
            ticket.served_version,
        )
        cause = unwrap(exc)
        attempts = int(getattr(cause, "attempts", getattr(exc, "attempts", ticket.attempts)))
        entry = None
        # Overloaded is backpressure (a deliberate 429 before any work), not a failure.
        if isinstance(cause, ServiceError) and not isinstance(cause, Overloaded) and not ticket.settled:
            entry = await self._dead_letter(ticket, cause, attempts)
        message = cause.message if isinstance(cause, HaifError) else type(cause).__name__
        await self._settle(
            ticket,
            Outcome(
                JobState.DEAD_LETTERED if entry is not None else JobState.FAILED,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                started_at=ticket.started_at,
                finished_at=datetime.now(UTC),
                error=message[:MAX_ERROR_CHARS],
                bill=completion_tokens > 0,
                attempts=max(1, attempts),
                worker=ticket.worker,
                region=ticket.region,
                version=ticket.version,
            ),
            entry,
        )

    async def _dead_letter(
        self, ticket: Ticket, exc: ServiceError, attempts: int
    ) -> DeadLetter | None:
        """The DLQ entry of ``ticket`` (None when there is no DLQ: no metadata store)."""
        if ticket.reservation is None or self.settlements is None or self.settlements.dlq is None:
            return None
        from haif.dlq import dead_letter

        item, dlq = ticket.item, self._config.dlq
        body = item.body
        if item.by_reference:  # fetched only now: a failure is rare, the hot path never reads it
            try:
                body = await asyncio.wait_for(item.body, timeout=dlq.body_fetch_timeout_s)
            except Exception as err:  # noqa: BLE001 - lost or too slow: the entry stands without it
                logger.warning(
                    "job %s: its body could not be fetched for the DLQ: %r", ticket.job_id, err
                )
                body = None
        entry = dead_letter(
            job_id=ticket.reservation.job_id,
            ctx=item.ctx,
            kind=item.kind,
            model=item.served_model,
            exc=exc,
            attempts=attempts,
            body=body,
            created_at=ticket.reservation.reserved_at,
            max_body_bytes=dlq.max_body_bytes,
        )
        logger.warning(
            "job %s dead-lettered after %d attempt(s): %s", entry.id, entry.attempts, entry.error
        )
        return entry

    async def _settle(
        self, ticket: Ticket, outcome: Outcome, entry: DeadLetter | None = None
    ) -> None:
        """Settle once. Awaited when the client could tell otherwise (a concurrency slot it
        may need next, duplicates waiting on its key, a dead letter to replay); else it runs
        after the response."""
        if ticket.reservation is None or ticket.settled or self._quotas is None:
            return
        ticket.settled = True
        task = asyncio.ensure_future(self._settle_now(ticket, ticket.reservation, outcome, entry))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        # A dead letter too: the client's error comes once the DLQ holds the entry.
        if ticket.reservation.holds_slot or ticket.key is not None or entry is not None:
            await asyncio.shield(task)  # a cancelled request still settles

    async def _settle_now(
        self,
        ticket: Ticket,
        reservation: Reservation,
        outcome: Outcome,
        entry: DeadLetter | None,
    ) -> None:
        try:
            if self.settlements is not None:
                # Queued for retry when the store is down.
                await self.settlements.settle(reservation, outcome, entry)
            elif self._quotas is not None:
                await self._quotas.settle(reservation, outcome)
        except Exception:  # a bug, not an outage: the job stays open and the sweeper closes it
            logger.exception("job %s was not settled", reservation.job_id)
        finally:
            if self._upkeep is not None:
                self._upkeep.finished(reservation.job_id)
            waiter = self._local.pop(ticket.key, None) if ticket.key is not None else None
            if waiter is not None and not waiter.done():  # duplicates here: read the row now
                waiter.set_result(None)

    # --- the tenant's own records ------------------------------------------------------------

    async def job(self, ctx: RequestContext, job_id: str) -> dict[str, Any]:
        """Raises: NotFound for unknown ids and other tenants' ids alike."""
        from haif.store import usage

        principal = await self.authenticate(ctx, scope=None)
        if self._db is None or principal.tenant_id is None:
            raise NotFound(f"no job {job_id!r}")
        found = await self._db.run(_read, self._db, usage.tenant_job, principal.tenant_id, job_id)
        if found is None:
            raise NotFound(f"no job {job_id!r}")
        return found

    async def jobs(self, ctx: RequestContext, limit: int) -> list[dict[str, Any]]:
        from haif.store import usage

        principal = await self.authenticate(ctx, scope=None)
        if self._db is None or principal.tenant_id is None:
            return []
        return await self._db.run(_read, self._db, usage.tenant_jobs, principal.tenant_id, limit)

    async def usage(
        self, ctx: RequestContext, since: datetime | None, limit: int
    ) -> list[dict[str, Any]]:
        from haif.store import usage

        principal = await self.authenticate(ctx, scope="admin")
        if self._db is None or principal.tenant_id is None:
            return []
        return await self._db.run(
            _read, self._db, usage.tenant_usage, principal.tenant_id, since, limit
        )


def _span_attributes(resolved: ResolvedModel) -> dict[str, Any]:
    """The request span's model attributes: the base (its version) and the adapter."""
    return {
        tracing.MODEL: resolved.base,
        tracing.MODEL_VERSION: resolved.version,
        tracing.ADAPTER: resolved.adapter.name if resolved.adapter is not None else None,
    }


def _read(db: Database, fn: Any, *args: Any) -> Any:
    with db.connect() as conn:
        return fn(conn, *args)
