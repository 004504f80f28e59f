"""Rollout and drain rows on every dialect; run on SQLite (unit) and PostgreSQL (integration).

Each ``case_*`` takes a migrated ``Database`` with no rollout rows.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from haif.exceptions import Conflict, InvalidRequest
from haif.store.db import Database
from haif.store.rollouts import (
    Rollout,
    RolloutRepository,
    finish_drain,
    pending_drains,
    read_rollouts,
    report_canary,
)


def _set(db: Database, version: str, weight: int, model: str = "m", config_version: str = "1") -> Rollout:
    with db.session() as s:
        return RolloutRepository(s).set(model, config_version, version, weight)


def _report(db: Database, generation: int, status: str, reason: str | None = None, model: str = "m") -> bool:
    with db.begin() as conn:
        return report_canary(conn, model, generation, status, reason)


def _get(db: Database, model: str = "m") -> Rollout | None:
    with db.session() as s:
        return RolloutRepository(s).get(model)


def case_set_starts_from_the_config_version(db: Database) -> None:
    r = _set(db, "2", 30)
    assert (r.base_version, r.stable_version, r.canary_version, r.canary_weight) == ("1", "1", "2", 30)
    assert (r.canary_status, r.reason, r.auto_rollbacks, r.generation) == (None, None, 0, 1)
    assert r.weights() == {"1": 70, "2": 30}
    assert r.updated_at.tzinfo is not None
    assert _get(db) == r  # committed, and read back the same


def case_same_version_changes_only_the_weight(db: Database) -> None:
    first = _set(db, "2", 30)
    assert _report(db, first.generation, "ready")
    second = _set(db, "2", 60)
    assert (second.canary_version, second.canary_weight, second.canary_status) == ("2", 60, "ready")
    assert second.generation == first.generation + 1
    again = _set(db, "2", 60)  # nothing to change: no new generation
    assert again.generation == second.generation


def case_another_canary_version_replaces_the_current_one(db: Database) -> None:
    first = _set(db, "2", 30)
    _report(db, first.generation, "failed", "artifact m:2 refused: untrusted signer")
    second = _set(db, "3", 10)
    assert (second.stable_version, second.canary_version, second.canary_weight) == ("1", "3", 10)
    assert (second.canary_status, second.reason) == (None, None)
    assert second.generation == first.generation + 1


def case_set_refuses_a_bad_weight_or_the_stable_version(db: Database) -> None:
    for weight in (-1, 101):
        with pytest.raises(InvalidRequest, match="between 0 and 100"):
            _set(db, "2", weight)
    for bad in ("bad version", "2\n", "", "x" * 65):
        with pytest.raises(InvalidRequest, match="version"):
            _set(db, bad, 10)
    with pytest.raises(Conflict, match="already the stable version"):
        _set(db, "1", 10)
    assert _get(db) is None  # refused: nothing written
    _set(db, "2", 0)  # 0 % and 100 % are both fine: workers start, traffic is the operator's
    assert _set(db, "2", 100).weights() == {"1": 0, "2": 100}


def case_the_database_checks_the_weight(db: Database) -> None:
    _set(db, "2", 30)
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(text("UPDATE rollouts SET canary_weight = 101"))
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(text("UPDATE rollouts SET canary_weight = -1"))
    assert _get(db).canary_weight == 30


def case_promote_needs_a_ready_canary(db: Database) -> None:
    with db.session() as s, pytest.raises(Conflict, match="no canary"):
        RolloutRepository(s).promote("m", "1")
    r = _set(db, "2", 30)
    with db.session() as s, pytest.raises(Conflict, match=r"not ready \(status: not reported yet\)"):
        RolloutRepository(s).promote("m", "1")
    _report(db, r.generation, "starting")
    with db.session() as s, pytest.raises(Conflict, match=r"status: starting"):
        RolloutRepository(s).promote("m", "1")
    _report(db, r.generation, "failed", "no free GPU in region eu")
    with db.session() as s, pytest.raises(Conflict, match=r"status: failed: no free GPU in region eu"):
        RolloutRepository(s).promote("m", "1")
    _report(db, r.generation, "ready", None)
    with db.session() as s:
        p = RolloutRepository(s).promote("m", "1")
    assert (p.base_version, p.stable_version, p.canary_version, p.canary_weight) == ("1", "2", None, 0)
    assert (p.canary_status, p.reason, p.generation) == (None, None, r.generation + 1)
    assert p.weights() == {"2": 100}
    # The promoted version is stable now: a canary of the config's version is allowed.
    assert _set(db, "1", 20).weights() == {"2": 80, "1": 20}


def case_rollback_drops_the_canary_and_says_why(db: Database) -> None:
    with db.session() as s, pytest.raises(Conflict, match="no canary"):
        RolloutRepository(s).rollback("m", "1")
    r = _set(db, "2", 30)
    with db.session() as s:
        b = RolloutRepository(s).rollback("m", "1")
    assert (b.stable_version, b.canary_version, b.canary_weight, b.canary_status) == ("1", None, 0, None)
    assert (b.reason, b.auto_rollbacks, b.generation) == ("rolled back by the operator", 0, r.generation + 1)
    assert b.weights() == {"1": 100}
    with db.session() as s, pytest.raises(Conflict, match="no canary"):
        RolloutRepository(s).rollback("m", "1")
    # The Orchestrator's own, for the generation it judged: counted, with its reason.
    r = _set(db, "2", 30)
    assert r.reason is None
    with db.session() as s, pytest.raises(Conflict, match="changed"):
        RolloutRepository(s).rollback("m", "1", "error rate", automatic=True, generation=r.generation - 1)
    with db.session() as s:
        a = RolloutRepository(s).rollback(
            "m", "1", "error rate 0.31 > 0.05 over 60 s", automatic=True, generation=r.generation
        )
    assert (a.reason, a.auto_rollbacks, a.canary_version) == ("error rate 0.31 > 0.05 over 60 s", 1, None)
    r = _set(db, "3", 10)
    with db.session() as s:
        a = RolloutRepository(s).rollback("m", "1", automatic=True)
    assert (a.reason, a.auto_rollbacks) == ("rolled back automatically", 2)


def case_a_stale_row_is_treated_as_absent(db: Database) -> None:
    old = _set(db, "2", 30)
    _report(db, old.generation, "ready")
    # Redeployed with version 5 in the config: the old rollout is superseded.
    assert not _get(db).applies_to("5") and _get(db).applies_to("1")
    with db.session() as s, pytest.raises(Conflict, match="no canary"):
        RolloutRepository(s).promote("m", "5")
    with db.session() as s, pytest.raises(Conflict, match="no canary"):
        RolloutRepository(s).rollback("m", "5")
    with pytest.raises(Conflict, match="already the stable version"):
        _set(db, "5", 10, config_version="5")
    fresh = _set(db, "2", 10, config_version="5")  # the old canary's version, anew
    assert (fresh.base_version, fresh.stable_version, fresh.canary_version) == ("5", "5", "2")
    assert (fresh.canary_weight, fresh.canary_status, fresh.reason, fresh.auto_rollbacks) == (10, None, None, 0)
    assert fresh.generation > old.generation  # a late report about the old rollout cannot match
    assert not _report(db, old.generation, "failed", "late")
    assert _get(db).canary_status is None


def case_report_canary_is_guarded_by_the_generation(db: Database) -> None:
    assert not _report(db, 1, "ready")  # no row
    r = _set(db, "2", 30)
    assert _report(db, r.generation, "starting", "pulling m:2")
    got = _get(db)
    assert (got.canary_status, got.reason, got.generation) == ("starting", "pulling m:2", r.generation)
    assert got.updated_at >= r.updated_at
    _set(db, "2", 50)  # the operator changed it meanwhile: the older report loses
    assert not _report(db, r.generation, "ready")
    assert _get(db).canary_status == "starting"
    assert _report(db, r.generation + 1, "ready")
    with db.session() as s:  # on a Session as well as on a Connection
        assert report_canary(s, "m", r.generation + 1, "ready", None)
    with pytest.raises(InvalidRequest, match="canary status"):
        _report(db, r.generation + 1, "happy")
    with db.session() as s:
        done = RolloutRepository(s).rollback("m", "1")
    assert not _report(db, done.generation, "ready")  # no canary to report on


def case_read_rollouts_returns_every_row(db: Database) -> None:
    with db.connect() as conn:
        assert read_rollouts(conn) == {}
    a = _set(db, "2", 30, model="a")
    b = _set(db, "v2", 5, model="b/c", config_version="v1")
    with db.connect() as conn:
        assert read_rollouts(conn) == {"a": a, "b/c": b}
    with db.session() as s:
        assert read_rollouts(s) == {"a": a, "b/c": b}
        assert RolloutRepository(s).list() == [a, b]


def case_drains_are_requested_and_finished(db: Database) -> None:
    with db.connect() as conn:
        assert pending_drains(conn) == []
    with db.session() as s:
        RolloutRepository(s).request_drain("tiny-llama/local/0#abcdef12")
        RolloutRepository(s).request_drain("tiny-llama/local/1#12345678")
    with db.session() as s:
        assert pending_drains(s) == ["tiny-llama/local/0#abcdef12", "tiny-llama/local/1#12345678"]
    with db.begin() as conn:
        finish_drain(conn, "tiny-llama/local/0#abcdef12", "drained")
        finish_drain(conn, "nobody", "unknown worker")  # nothing asked: nothing to mark
    with db.connect() as conn:
        assert pending_drains(conn) == ["tiny-llama/local/1#12345678"]
        row = conn.execute(
            text("SELECT done_at, outcome FROM worker_drains WHERE worker_id = 'tiny-llama/local/0#abcdef12'")
        ).one()
        assert row[0] is not None and row[1] == "drained"
    with db.session() as s:  # asked again: pending again
        RolloutRepository(s).request_drain("tiny-llama/local/0#abcdef12")
    with db.connect() as conn:
        assert pending_drains(conn) == ["tiny-llama/local/1#12345678", "tiny-llama/local/0#abcdef12"]
        assert conn.execute(text("SELECT count(*) FROM worker_drains")).scalar() == 2
    for bad in ("", "a b", "w\n", "x" * 257):
        with db.session() as s, pytest.raises(InvalidRequest, match="worker id"):
            RolloutRepository(s).request_drain(bad)


CASES = [value for name, value in sorted(globals().items()) if name.startswith("case_")]
