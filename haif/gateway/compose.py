"""The Gateway's composition root: every collaborator of a replica built in one place.

``compose(config, orchestrator)`` builds what a Serve replica of the Gateway uses: the
admission chain (authentication, quotas, leases, idempotency, settlements, the DLQ,
job upkeep, usage export), the router and the routing table's long-poll client.
A test builds ``GatewayParts`` itself, with fakes where it wants them, and passes it to
``Gateway(config, parts=...)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from haif.exceptions import ConfigError
from haif.gateway.admission import Admission
from haif.gateway.auth import (
    Authenticator,
    CredentialCaches,
    DatabaseAuthenticator,
    PeerAuthenticator,
    StaticKeyAuthenticator,
)
from haif.gateway.identity import CallerAuthenticator, TenantDirectory
from haif.gateway.metrics import GatewayMetrics
from haif.orchestrator.router import Router
from haif.orchestrator.table import TableClient
from haif.telemetry.metrics import MetricsTarget, OrchestratorMetrics, ProcessMetrics

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig
    from haif.dlq import DeadLetterQueue
    from haif.gateway.lease import QuotaLeases
    from haif.gateway.ratelimit import RedisRateLimiter
    from haif.orchestrator.table import RoutingTable
    from haif.store.db import Database

logger = logging.getLogger("haif.gateway")

Background = Callable[["asyncio.Event"], Awaitable[None]]


@dataclass
class GatewayParts:
    """What one Gateway replica is made of."""

    admission: Admission
    router: Router
    table: TableClient | None = None  # None: the router's table is set by hand (tests)
    background: list[Background] = field(default_factory=list)  # started once a loop runs
    db: Database | None = None
    dlq: DeadLetterQueue | None = None
    limiter: RedisRateLimiter | None = None
    leases: QuotaLeases | None = None
    metrics: ProcessMetrics | None = None
    routing_metrics: OrchestratorMetrics | None = None
    p2p: DeploymentHandle | None = None  # the P2P shim, for its state in /readyz
    caches: CredentialCaches = field(default_factory=lambda: CredentialCaches())
    auth_changed: Callable[[], Awaitable[None]] | None = None  # Pipeline.auth_changed


# The admin API waits this long for the Orchestrator to publish an auth change.
AUTH_NOTICE_TIMEOUT_S = 5.0


def default_authenticator(config: HaifConfig) -> Authenticator:
    """The static backend's authenticator: the development key only.

    Raises:
        ConfigError: ``auth.dev_key`` is off, or the key is unset (``haif serve`` generates it
            before deploying).
    """
    if not config.auth.dev_key or not config.auth.dev_api_key:
        raise ConfigError(
            "auth.backend is static but auth.dev_api_key is unset (auth.dev_key: true mints it): "
            "it is the only key served"
        )
    return StaticKeyAuthenticator(config.auth.dev_api_key, config.auth.dev_tenant)


def replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests, tools): no id to record
        return None


def compose(
    config: HaifConfig, orchestrator: DeploymentHandle, p2p: DeploymentHandle | None = None
) -> GatewayParts:
    """The collaborators of a Serve replica of the Gateway, wired to ``orchestrator`` (and to
    the P2P shim ``p2p``, when it runs)."""
    process = ProcessMetrics.start(MetricsTarget.from_config(config), "gateway")
    metrics = GatewayMetrics(process, (m.name for m in config.models))
    # By reference (Ray's actor calls): the table carries actor handles.
    refresh_s = config.resilience.routing_table_refresh_s

    def worker_died(worker_id: str) -> None:
        # Fire and forget: the Orchestrator confirms the death and replaces the worker.
        orchestrator.worker_died.remote(worker_id)

    def demand(model: str) -> None:
        # Fire and forget: requests wait for a model scaled to zero; start a worker now.
        orchestrator.demand.remote(model)

    router = Router(config, on_dead=worker_died, p2p=p2p, on_demand=demand)
    gateway = replica_id() or "gateway"

    def listen(version: str | None) -> object:
        # Each long-poll carries this replica's figures: its queues (the autoscaler) and
        # each version's finished and failed requests (the canary's judge).
        report = {"gateway": gateway, "queued": router.queued(), "outcomes": metrics.take_outcomes()}
        return orchestrator.listen.remote(version, refresh_s, report)

    def on_table(table: RoutingTable) -> None:
        router.update(table)
        parts.caches.observe(table.auth_epoch)

    table = TableClient(listen, on_table, refresh_s)
    if config.auth.backend == "static":
        peers = _peers(config, None)
        admission = Admission(
            config, default_authenticator(config), metrics=metrics, peers=peers, versions=router.version_of
        )
        parts = GatewayParts(admission, router)
    else:
        parts = _tenancy(config, metrics, router)
    parts.table, parts.metrics, parts.routing_metrics = table, process, OrchestratorMetrics(process)
    parts.p2p = p2p
    parts.background.append(table.run)

    async def auth_changed() -> None:
        parts.caches.forget()
        try:  # publishes the new epoch to every replica now
            await asyncio.wait_for(orchestrator.auth_changed.remote(), AUTH_NOTICE_TIMEOUT_S)
        except Exception as exc:  # the change is stored: its control round carries it instead
            logger.warning(
                "auth change: the Orchestrator did not answer (%s); the other Gateway replicas see "
                "it at its next read of the store (auth.change_poll_s)", type(exc).__name__,
            )

    parts.auth_changed = auth_changed
    return parts


def _tenancy(config: HaifConfig, metrics: GatewayMetrics, router: Router) -> GatewayParts:
    from haif.dlq import DeadLetterQueue
    from haif.gateway.quota import QuotaGate
    from haif.gateway.settlement import Settlements
    from haif.gateway.upkeep import JobUpkeep
    from haif.store.aio import AsyncWrites
    from haif.store.db import Database

    background: list[Background] = []
    # The schema was migrated by bootstrap before deploying: replicas only connect.
    db = Database.from_config(config)
    limiter = None
    if config.rate_limits_on_redis():
        from haif.gateway.ratelimit import RedisRateLimiter

        limiter = RedisRateLimiter(config.redis)
    # On PostgreSQL the request's two writes go out from the event loop itself, and
    # most requests are admitted on a quota lease, with no round trip before dispatch.
    writes = AsyncWrites.from_config(config)
    leases = None
    if writes is not None and config.quotas.lease_fraction > 0:
        from haif.gateway.lease import QuotaLeases

        leases = QuotaLeases(
            writes,
            config.quotas,
            on_event=lambda event: metrics.registry.inc("haif_quota_leases_total", (event,)),
            record_after_s=config.jobs.mark_running_after_s / 2,
        )
        background.append(leases.run)  # idle leases give back; all of them at stop
    quotas = QuotaGate(
        db,
        limiter,
        writes,
        leases=leases,
        redis_unavailable=config.quotas.redis_unavailable,
        redis_retry_after_s=config.quotas.redis_retry_after_s,
    )
    dlq = DeadLetterQueue(config, db)
    settlements = Settlements(quotas, db, dlq, config.jobs)
    background.append(settlements.run)  # settlements the store refused, retried
    upkeep = JobUpkeep(db, config, settlements.pending)
    background.append(upkeep.run)
    if config.usage.webhook_url:
        from haif.gateway.usage_export import UsageExporter

        background.append(UsageExporter(db, config.usage).run)
    keys = DatabaseAuthenticator(db, config.auth.token_cache_ttl_s, config.auth.token_cache_max_entries)
    tenants = TenantDirectory(db, config.auth.token_cache_ttl_s, config.auth.token_cache_max_entries)
    oidc = None
    if config.auth.oidc:
        from haif.gateway.oidc import OidcAuthenticator

        oidc = OidcAuthenticator(
            list(config.auth.oidc), tenants,
            cache_s=config.auth.token_cache_ttl_s, max_entries=config.auth.token_cache_max_entries,
        )
    peers = _peers(config, db)
    admission = Admission(
        config,
        CallerAuthenticator(keys, oidc),
        db=db,
        quotas=quotas,
        upkeep=upkeep,
        replica=replica_id(),
        metrics=metrics,
        settlements=settlements,
        peers=peers,
        versions=router.version_of,
    )
    return GatewayParts(
        admission, router, background=background, db=db, dlq=dlq, limiter=limiter, leases=leases,
        caches=CredentialCaches(keys, tenants, oidc, peers),
    )


def _peers(config: HaifConfig, db: Database | None) -> PeerAuthenticator | None:
    """P2P callers' keys → tenants, when the P2P shim runs."""
    if not config.p2p.enabled:
        return None
    return PeerAuthenticator(
        dict(config.p2p.peers), db, config.auth.token_cache_ttl_s, config.auth.token_cache_max_entries
    )
