"""``AdminService``: the admin operations carried out on the metadata store.

The admin API's routes build one per request, for the caller (:class:`~haif.admin.audit.Actor`),
with the Gateway replica's live view and replay; the CLI without ``HAIF_URL`` builds one on
the config's database (``direct_operations``), acting as ``cli:<user>`` with the admin role
(whoever holds the database's credentials holds the platform).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from haif.admin.audit import Actor
from haif.admin.fleet import FleetOperations
from haif.admin.tenancy import TenancyOperations

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from haif.admin.fleet import Replay
    from haif.config import HaifConfig
    from haif.dlq import DeadLetterQueue
    from haif.orchestrator.table import RoutingTable
    from haif.store.db import Database


class AdminService(TenancyOperations, FleetOperations):
    """Every operation of :class:`~haif.admin.operations.Operations`, for ``actor``.

    ``auth_epoch`` is set when a call changed what authenticates (a revoked token, a
    suspended or resumed tenant, a removed peer): the caller tells the Gateways.
    """

    def __init__(
        self,
        db: Database,
        config: HaifConfig,
        actor: Actor,
        dlq: DeadLetterQueue | None = None,
        live: Callable[[], RoutingTable] | None = None,
        replay: Replay | None = None,
    ) -> None:
        TenancyOperations.__init__(self, db, config, actor)
        FleetOperations.__init__(self, db, config, actor, dlq, live, replay)


@contextmanager
def direct_operations(config: HaifConfig, actor: Actor | None = None) -> Iterator[AdminService]:
    """The operations on ``config``'s metadata store (migrated if ``database.auto_migrate``)
    and DLQ, as ``actor`` (default: ``cli:<os user>``, admin)."""
    from haif.dlq import DeadLetterQueue
    from haif.store import open_database

    db = open_database(config, pool_size=1)
    dlq: Any = None
    try:
        dlq = DeadLetterQueue(config, db)
        yield AdminService(db, config, actor or Actor.cli(), dlq=dlq)
    finally:
        if dlq is not None:
            dlq.close()
        db.close()
