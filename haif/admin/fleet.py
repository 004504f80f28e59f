"""The fleet side of the admin operations: served models, rollouts, workers, dead letters.

Rollouts and drains are rows of the metadata store that the Orchestrator reads within
``rollouts.poll_s`` (:mod:`haif.store.rollouts`). What runs now (workers, their states,
each version's weight) is the routing table a Gateway replica holds: ``live`` gives it
where the operations run in a Gateway; the CLI on the database has no live view.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from haif.admin import audit, pages
from haif.admin.operations import DEFAULT_PAGE, MAX_PAGE, Page, Record
from haif.exceptions import InvalidRequest, ModelNotFound, NotFound, PermissionDenied, UnsupportedOperation

if TYPE_CHECKING:
    from haif.admin.audit import Actor
    from haif.config import HaifConfig, ModelConfig
    from haif.dlq import DeadLetterQueue
    from haif.orchestrator.table import RoutingTable
    from haif.store.db import Database
    from haif.store.rollouts import Rollout

# Dead letters page by position (the Redis stream and the table merged, newest first).
MAX_DLQ_OFFSET = 10_000
NO_LIVE_VIEW = "this needs a running deployment: set HAIF_URL and HAIF_TOKEN (or --url, --token)"
# A replay: (the dead letter's JSON) -> {"job_id", "state", "executed"}; the Gateway's own.
Replay = Callable[[dict[str, Any]], dict[str, Any]]


def model_config(config: HaifConfig, name: str) -> ModelConfig:
    model = config.model(name)
    if model is None:
        known = ", ".join(m.name for m in config.models) or "none"
        raise ModelNotFound(f"no model {name!r} in the config (models: {known})")
    return model


def rollout_record(model: ModelConfig, row: Rollout | None) -> Record:
    """A model's rollout, or its config version at 100 % when it has none."""
    if row is None or not row.applies_to(model.version):
        return {
            "model": model.name, "config_version": model.version, "stable_version": model.version,
            "canary_version": None, "canary_weight": 0, "weights": {model.version: 100},
            "canary_status": None, "reason": None, "auto_rollbacks": 0, "generation": None,
            "updated_at": None,
        }
    return {
        "model": model.name, "config_version": model.version, "stable_version": row.stable_version,
        "canary_version": row.canary_version, "canary_weight": row.canary_weight, "weights": row.weights(),
        "canary_status": row.canary_status, "reason": row.reason, "auto_rollbacks": row.auto_rollbacks,
        "generation": row.generation, "updated_at": row.updated_at.isoformat(timespec="seconds"),
    }


def worker_record(model: str, worker: Any) -> Record:
    return {
        "id": worker.worker_id, "model": model, "version": worker.version, "region": worker.region,
        "tier": worker.tier, "state": worker.state, "capacity": worker.capacity, "load": worker.load,
        "peer": worker.peer,
    }


class FleetOperations:
    """Models, rollouts, workers and dead letters (admin only)."""

    def __init__(
        self,
        db: Database,
        config: HaifConfig,
        actor: Actor,
        dlq: DeadLetterQueue | None = None,
        live: Callable[[], RoutingTable] | None = None,
        replay: Replay | None = None,
    ) -> None:
        self._db = db
        self._config = config
        self.actor = actor
        self._dlq = dlq
        self._live = live
        self._replay = replay

    def _require_admin(self) -> None:
        if self.actor.role != "admin":
            raise PermissionDenied("this needs the admin scope")

    def _table(self) -> RoutingTable:
        if self._live is None:
            raise UnsupportedOperation(NO_LIVE_VIEW)
        return self._live()

    # --- models and rollouts ---------------------------------------------------------------

    def _rollouts(self) -> dict[str, Rollout]:
        from haif.store.rollouts import read_rollouts

        with self._db.session() as session:
            return read_rollouts(session)

    def list_models(self) -> Page:
        self._require_admin()
        table = self._table()
        rows = self._rollouts()
        data = []
        for model in self._config.models:
            routes = table.models.get(model.name)
            workers = routes.workers if routes is not None else ()
            weights = dict(routes.weights) if routes is not None else {}
            versions = sorted({w.version for w in workers} | set(weights))
            data.append({
                "model": model.name, "runtime": model.runtime, "device": model.device,
                "enabled": model.enabled,
                "versions": {
                    v: {"weight": weights.get(v, 0),
                        "workers": dict(Counter(w.state for w in workers if w.version == v))}
                    for v in versions
                },
                "rollout": rollout_record(model, rows.get(model.name)),
            })
        return {"data": data, "next_cursor": None}

    def list_rollouts(self) -> Page:
        self._require_admin()
        rows = self._rollouts()
        return {"data": [rollout_record(m, rows.get(m.name)) for m in self._config.models], "next_cursor": None}

    def get_rollout(self, model: str) -> Record:
        self._require_admin()
        served = model_config(self._config, model)
        return rollout_record(served, self._rollouts().get(served.name))

    def _change_rollout(self, model: str, action: Literal["set", "promote", "rollback"], *args: Any) -> Record:
        from haif.store.rollouts import RolloutRepository

        self._require_admin()
        served = model_config(self._config, model)
        if action == "set":
            version = args[0]
            served.at_version(version)  # UnprocessableRequest: no versions side by side for it
        with self._db.session() as session:
            repo = RolloutRepository(session)
            before = rollout_record(served, repo.get(served.name))
            if action == "set":
                row = repo.set(served.name, served.version, *args)
            else:
                row = getattr(repo, action)(served.name, served.version)
            after = rollout_record(served, row)
            audit.record(session, self.actor, f"rollout.{action}", f"model:{served.name}", before, after)
        return after

    def set_rollout(self, model: str, version: str, weight: int) -> Record:
        return self._change_rollout(model, "set", version, weight)

    def promote(self, model: str) -> Record:
        return self._change_rollout(model, "promote")

    def rollback(self, model: str) -> Record:
        return self._change_rollout(model, "rollback")

    # --- workers ---------------------------------------------------------------------------

    def list_workers(
        self, model: str | None = None, state: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        self._require_admin()
        pages.check_limit(limit)
        key = pages.decode(cursor, (str,))
        table = self._table()
        workers = sorted(
            (worker_record(name, w) for name, routes in table.models.items() for w in routes.workers
             if model in (None, name) and state in (None, w.state)),
            key=lambda r: r["id"],
        )
        if key is not None:
            workers = [w for w in workers if w["id"] > key[0]]
        return pages.page(workers, limit, lambda r: r, lambda r: (r["id"],))

    def drain_worker(self, worker_id: str) -> Record:
        from datetime import UTC, datetime

        from haif.store.rollouts import RolloutRepository

        self._require_admin()
        if self._live is not None:
            known = {w.worker_id for routes in self._live().models.values() for w in routes.workers}
            if worker_id not in known:
                raise NotFound(f"no worker {worker_id!r} in the routing table")
        with self._db.session() as session:
            RolloutRepository(session).request_drain(worker_id)
            after = {"worker_id": worker_id, "requested_at": datetime.now(UTC).isoformat(timespec="seconds"),
                     "state": "requested"}
            audit.record(session, self.actor, "worker.drain", f"worker:{worker_id}", None, after)
        return after

    # --- dead letters ----------------------------------------------------------------------

    def _queue(self) -> DeadLetterQueue:
        if self._dlq is None:
            raise UnsupportedOperation("no dead-letter queue here")
        return self._dlq

    def list_dead_letters(
        self, tenant: str | None = None, model: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        self._require_admin()
        pages.check_limit(limit)
        key = pages.decode(cursor, (int,))
        offset = key[0] if key is not None else 0
        if not 0 <= offset <= MAX_DLQ_OFFSET:
            raise InvalidRequest("cursor is not one this list gave out")
        # A model filter looks at the newest MAX_DLQ_OFFSET entries.
        wanted = MAX_DLQ_OFFSET + MAX_PAGE + 1 if model is not None else offset + limit + 1
        entries = self._queue().newest(wanted, tenant)
        if model is not None:
            entries = [e for e in entries if e.model == model]
        window = entries[offset:offset + limit + 1]
        return pages.page(window, limit, lambda e: e.summary(), lambda e: (offset + limit,))

    def get_dead_letter(self, entry_id: str) -> Record:
        self._require_admin()
        entry = self._queue().get(entry_id)
        if entry is None:
            raise NotFound(f"no dead letter {entry_id!r}")
        return entry.model_dump(mode="json")

    def replay_dead_letter(self, entry_id: str, keep: bool = False) -> Record:
        self._require_admin()
        if self._replay is None:
            raise UnsupportedOperation(NO_LIVE_VIEW)
        entry = self.get_dead_letter(entry_id)
        result = self._replay(entry)
        if not keep:
            self._queue().remove(entry_id)
        outcome = {"id": entry_id, **{k: result[k] for k in ("job_id", "state", "executed")}}
        with self._db.session() as session:
            audit.record(session, self.actor, "dlq.replay", f"dead_letter:{entry_id}", None, outcome)
        return outcome

    def purge_dead_letter(self, entry_id: str) -> Record:
        self._require_admin()
        if not self._queue().remove(entry_id):
            raise NotFound(f"no dead letter {entry_id!r}")
        with self._db.session() as session:
            audit.record(session, self.actor, "dlq.purge", f"dead_letter:{entry_id}", None, None)
        return {"id": entry_id, "purged": True}

    def purge_dead_letters(self) -> Record:
        self._require_admin()
        count = self._queue().remove_all()
        with self._db.session() as session:
            audit.record(session, self.actor, "dlq.purge_all", "dead_letters", None, {"purged": count})
        return {"purged": count}


def run_coroutine(loop: asyncio.AbstractEventLoop, make: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``make()`` (a coroutine) on ``loop`` from a worker thread and wait for it."""
    return asyncio.run_coroutine_threadsafe(make(), loop).result(timeout_s)
