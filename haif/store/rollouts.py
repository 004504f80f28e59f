"""Rollouts: a model's stable version, a canary version beside it, and the canary's weight.

The operator writes them (``haif rollout set|promote|rollback``, through
:class:`RolloutRepository`); the Orchestrator reads every row on each poll with
:func:`read_rollouts` (one SELECT), applies them through the routing table (never per
request through the database), and writes the canary's state back with
:func:`report_canary`. Drain requests (``haif workers drain``) are rows of their own:
:meth:`RolloutRepository.request_drain` writes one, the Orchestrator reads
:func:`pending_drains` and closes each with :func:`finish_drain`.

Every operator change bumps the row's ``generation``. The Orchestrator reports the
canary's status for the generation it applied; a report for an older one is dropped, so
that an operator's change is never overwritten by news about what it replaced.

Stale rows. A row remembers the config's version of the model when its rollout began
(``base_version``). A redeploy whose config names another version supersedes the
rollout: :meth:`RolloutRepository.set`, ``promote`` and ``rollback`` treat such a row as
absent (``set`` starts afresh from the config's version; ``promote`` and ``rollback``
find no canary), and the Orchestrator ignores it (:meth:`Rollout.applies_to`). The
config's version is ``ModelConfig.version``.

Versions of a model are artifacts ``name:version`` of the artifact the config serves
(``ModelConfig.at_version``); on the ``echo`` runtime, which has no weights, they are labels.

The functions that take ``conn_or_session`` accept a SQLAlchemy ``Connection`` or
``Session`` and neither commit nor roll back: the caller owns the transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from haif.exceptions import Conflict, InvalidRequest
from haif.store.models import RolloutRow, WorkerDrain

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session


    ConnOrSession = Connection | Session

# What the Orchestrator reports about a canary's workers.
CANARY_STATUSES: Final = frozenset({"starting", "ready", "failed"})
MAX_WEIGHT: Final = 100
# An artifact version (haif.artifacts.manifest) that fits the 64-character columns.
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
WORKER_ID_MAX: Final = 256
# As the Orchestrator names workers (model/region/index#actor): printable ASCII, no spaces.
WORKER_ID = re.compile(rf"[!-~]{{1,{WORKER_ID_MAX}}}")
ROLLED_BACK_BY_OPERATOR: Final = "rolled back by the operator"
ROLLED_BACK_AUTOMATICALLY: Final = "rolled back automatically"


@dataclass(frozen=True)
class Rollout:
    """A model's rollout row, as read."""

    model: str
    base_version: str  # the config's version when the rollout began
    stable_version: str
    canary_version: str | None
    canary_weight: int  # percent of the model's requests asked for the canary
    canary_status: str | None  # starting | ready | failed, as the Orchestrator reported it
    reason: str | None  # why the canary gets no traffic, or why it was rolled back
    auto_rollbacks: int
    generation: int
    updated_at: datetime

    def weights(self) -> dict[str, int]:
        """The asked weights by version, in percent: ``{stable: 100 - w, canary: w}``, or
        ``{stable: 100}`` without a canary. What is served also needs the canary ready."""
        if self.canary_version is None:
            return {self.stable_version: MAX_WEIGHT}
        return {
            self.stable_version: MAX_WEIGHT - self.canary_weight,
            self.canary_version: self.canary_weight,
        }

    def applies_to(self, config_version: str) -> bool:
        """False for a stale row: the config names another version than the rollout began from."""
        return self.base_version == config_version


_COLUMNS = (
    RolloutRow.model,
    RolloutRow.base_version,
    RolloutRow.stable_version,
    RolloutRow.canary_version,
    RolloutRow.canary_weight,
    RolloutRow.canary_status,
    RolloutRow.reason,
    RolloutRow.auto_rollbacks,
    RolloutRow.generation,
    RolloutRow.updated_at,
)


def _rollout(row: RolloutRow) -> Rollout:
    return Rollout(**{c.key: getattr(row, c.key) for c in _COLUMNS})


def read_rollouts(conn_or_session: ConnOrSession) -> dict[str, Rollout]:
    """Every rollout row by model, stale ones included (one SELECT)."""
    rows = conn_or_session.execute(select(*_COLUMNS).order_by(RolloutRow.model)).all()
    return {r.model: Rollout(**r._asdict()) for r in rows}


def report_canary(
    conn_or_session: ConnOrSession, model: str, generation: int, status: str, reason: str | None
) -> bool:
    """The Orchestrator's news about ``model``'s canary, written only while the row is still at
    ``generation`` (an operator's change since wins). True if written.

    Raises:
        InvalidRequest: ``status`` is not one of :data:`CANARY_STATUSES`.
    """
    if status not in CANARY_STATUSES:
        known = ", ".join(sorted(CANARY_STATUSES))
        raise InvalidRequest(f"canary status {status!r} is not one of {known}")
    result = conn_or_session.execute(
        update(RolloutRow)
        .where(
            RolloutRow.model == model,
            RolloutRow.generation == generation,
            RolloutRow.canary_version.is_not(None),
        )
        .values(canary_status=status, reason=reason, updated_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def pending_drains(conn_or_session: ConnOrSession) -> list[str]:
    """The workers asked to drain and not done yet, oldest request first."""
    rows = conn_or_session.execute(
        select(WorkerDrain.worker_id)
        .where(WorkerDrain.done_at.is_(None))
        .order_by(WorkerDrain.requested_at, WorkerDrain.worker_id)
    )
    return list(rows.scalars())


def finish_drain(conn_or_session: ConnOrSession, worker_id: str, outcome: str) -> None:
    """Marks ``worker_id``'s drain done, with what happened (``drained``, ``unknown worker``...)."""
    conn_or_session.execute(
        update(WorkerDrain)
        .where(WorkerDrain.worker_id == worker_id)
        .values(done_at=datetime.now(UTC), outcome=outcome)
        .execution_options(synchronize_session=False)
    )


class RolloutRepository:
    """The operator's rollout and drain changes (CLI), on a session; the caller commits."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, model: str) -> Rollout | None:
        """``model``'s row as stored (possibly stale: see :meth:`Rollout.applies_to`)."""
        row = self.session.get(RolloutRow, model)
        return None if row is None else _rollout(row)

    def list(self) -> list[Rollout]:
        """Every row, by model."""
        return list(read_rollouts(self.session).values())

    def set(self, model: str, config_version: str, version: str, weight: int) -> Rollout:
        """Asks ``weight`` percent of ``model``'s requests for ``version`` (the canary).

        Without a current row (none, or a stale one) the rollout starts from the config's
        version as the stable one. Another canary version than the current one replaces it
        (its reported status and reason are cleared); the same one only changes its weight.
        Setting what is already set changes nothing.

        Raises:
            InvalidRequest: ``weight`` outside 0..100, or a malformed version.
            Conflict: ``version`` is the stable version already.
        """
        if not 0 <= weight <= MAX_WEIGHT:
            raise InvalidRequest(
                f"--weight must be between 0 and {MAX_WEIGHT} (percent), not {weight}"
            )
        _check_version(version)
        row = self.session.get(RolloutRow, model, with_for_update=True)
        live = row is not None and row.base_version == config_version
        stable = row.stable_version if live else config_version
        if version == stable:
            raise Conflict(f"version {version} is already the stable version of {model}")
        if live and row.canary_version == version and row.canary_weight == weight:
            return _rollout(row)
        if row is None:
            row = RolloutRow(model=model, generation=0)
            self.session.add(row)
        if not live:
            # A new rollout. A stale row's generation keeps counting, so that a late report
            # about the superseded rollout can never match the new one.
            row.base_version = row.stable_version = config_version
            row.canary_version = row.canary_status = row.reason = None
            row.canary_weight = row.auto_rollbacks = 0
        if row.canary_version != version:
            row.canary_version, row.canary_status, row.reason = version, None, None
        row.canary_weight = weight
        row.generation += 1
        row.updated_at = datetime.now(UTC)
        self._flush(model)
        return _rollout(row)

    def promote(self, model: str, config_version: str) -> Rollout:
        """Makes the canary the stable version at 100 % (the old version's workers drain).

        Raises:
            Conflict: no canary, or it is not ready (the message says its status and why).
        """
        row = self._with_canary(model, config_version, "promote")
        if row.canary_status != "ready":
            why = f": {row.reason}" if row.reason else ""
            raise Conflict(
                f"the canary {row.canary_version} of {model} is not ready "
                f"(status: {row.canary_status or 'not reported yet'}{why}); not promoted"
            )
        row.stable_version = row.canary_version
        self._clear_canary(row, reason=None)
        self._flush(model)
        return _rollout(row)

    def rollback(
        self,
        model: str,
        config_version: str,
        reason: str | None = None,
        automatic: bool = False,
        *,
        generation: int | None = None,
    ) -> Rollout:
        """Returns 100 % to the stable version and drops the canary (its workers drain).

        Args:
            reason: why, kept on the row; default "rolled back by the operator" (or
                "rolled back automatically").
            automatic: the Orchestrator's own rollback (counted in ``auto_rollbacks``).
            generation: only if the row is still at this generation (the one whose canary
                the Orchestrator judged); an operator's change since wins.

        Raises:
            Conflict: no canary, or the row moved past ``generation``.
        """
        row = self._with_canary(model, config_version, "roll back")
        if generation is not None and row.generation != generation:
            raise Conflict(
                f"the rollout of {model} changed (generation {row.generation}, not {generation}); "
                "not rolled back"
            )
        if automatic:
            row.auto_rollbacks += 1
        default = ROLLED_BACK_AUTOMATICALLY if automatic else ROLLED_BACK_BY_OPERATOR
        self._clear_canary(row, reason=reason or default)
        self._flush(model)
        return _rollout(row)

    def request_drain(self, worker_id: str) -> None:
        """Asks the Orchestrator to drain ``worker_id`` (again, if it was drained before).

        Raises:
            InvalidRequest: an empty or too long id, or one with spaces.
        """
        if not WORKER_ID.fullmatch(worker_id):
            raise InvalidRequest(
                f"a worker id is 1-{WORKER_ID_MAX} printable ASCII characters without spaces"
            )
        row = self.session.get(WorkerDrain, worker_id, with_for_update=True)
        if row is None:
            row = WorkerDrain(worker_id=worker_id)
            self.session.add(row)
        row.requested_at, row.done_at, row.outcome = datetime.now(UTC), None, None
        try:
            self.session.flush()
        except IntegrityError:
            raise Conflict(f"a drain of {worker_id} was requested at the same time") from None

    def _flush(self, model: str) -> None:
        try:
            self.session.flush()
        except IntegrityError:
            # Two first rollouts of a model at once: the other one's row is there now.
            raise Conflict(f"the rollout of {model} was changed at the same time; retry") from None

    def _with_canary(self, model: str, config_version: str, action: str) -> RolloutRow:
        row = self.session.get(RolloutRow, model, with_for_update=True)
        if row is None or row.base_version != config_version or row.canary_version is None:
            raise Conflict(f"{model} has no canary to {action}")
        return row

    @staticmethod
    def _clear_canary(row: RolloutRow, reason: str | None) -> None:
        row.canary_version = row.canary_status = None
        row.canary_weight = 0
        row.reason = reason
        row.generation += 1
        row.updated_at = datetime.now(UTC)


def _check_version(version: str) -> None:
    if not VERSION.fullmatch(version):
        raise InvalidRequest(
            f"version {version!r}: 1-64 characters, letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit"
        )
