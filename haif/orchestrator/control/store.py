"""The metadata store as the control plane reads and writes it: the rollout rows (read
every poll; the canary's state and the automatic rollbacks written back) and the drain
requests of ``haif workers drain``.

Blocking calls (SQLAlchemy): the policies run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from haif.exceptions import HaifError

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.store.db import Database
    from haif.store.rollouts import Rollout

logger = logging.getLogger("haif.orchestrator")


class ControlStore:
    """The rollouts and drain requests of one metadata store."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._down = False

    @classmethod
    def open(cls, config: HaifConfig) -> ControlStore | None:
        """The store of ``config`` (None: none, the config's versions alone, no rollouts)."""
        try:
            from haif.store.db import Database

            return cls(Database.from_config(config, pool_size=1))
        except Exception as exc:  # no store: the config's versions alone, no rollouts
            logger.warning("rollouts: no metadata store (%s); serving the config's versions", exc)
            return None

    def read_rollouts(self) -> dict[str, Rollout] | None:
        """Every rollout row; None when the store does not answer (the rollouts applied stay:
        an outage must not look like "no rollout" and undo them)."""
        from haif.store.rollouts import read_rollouts

        try:
            with self._db.connect() as conn:
                rows = read_rollouts(conn)
        except Exception as exc:
            if not self._down:  # one line per outage, not one per poll
                logger.warning("rollouts: the metadata store did not answer (%s); the rollouts "
                               "applied stay as they are", type(exc).__name__)
            self._down = True
            return None
        if self._down:
            logger.info("rollouts: the metadata store answers again")
        self._down = False
        return rows

    def read_auth_epoch(self) -> int | None:
        """The last auth change's id (0: none yet); None when the store does not answer."""
        from haif.admin.audit import auth_epoch

        try:
            with self._db.connect() as conn:
                return auth_epoch(conn)
        except Exception:  # the rollouts' read says the store is down, once per outage
            return None

    def rollback(self, model: str, version: str, reason: str, generation: int) -> bool:
        """Record an automatic rollback, unless the rollout changed since ``generation``
        (that change wins). Whether it was recorded."""
        from haif.store.rollouts import RolloutRepository

        try:
            with self._db.session() as session:
                RolloutRepository(session).rollback(
                    model, version, reason=reason, automatic=True, generation=generation
                )
            return True
        except HaifError as exc:
            logger.info("rollout of %s: automatic rollback not recorded: %s", model, exc.message)
            return False

    def report_canary(self, model: str, generation: int, state: str, reason: str | None) -> bool:
        """Write the canary's state (starting | ready | failed, and why) to its row."""
        from haif.store.rollouts import report_canary

        with self._db.begin() as conn:
            return report_canary(conn, model, generation, state, reason)

    def pending_drains(self) -> list[str]:
        """The workers ``haif workers drain`` asked to drain, not taken yet."""
        from haif.store.rollouts import pending_drains

        with self._db.connect() as conn:
            return pending_drains(conn)

    def finish_drain(self, worker_id: str, outcome: str) -> None:
        from haif.store.rollouts import finish_drain

        with self._db.begin() as conn:
            finish_drain(conn, worker_id, outcome)
