"""`haif rollout`: a canary version beside a model's stable one, its weight, promote and rollback.

The commands write the metadata store of the config (``database.url``), not a running
deployment: the Orchestrator reads the rows within a poll, starts the canary's workers
and sends it its weight once they are ready (:mod:`haif.store.rollouts`). ``status``
also shows what a deployment answering at the config's URL reports (its ``/readyz``).

Exit codes: 0 done; 1 unknown model, nothing to promote or roll back, a canary not ready,
or the store is down; 2 usage or config error (a weight outside 0..100, a model that
cannot have versions side by side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from haif.cli._common import ConfigOption, db_session, errors_to_exit, load

if TYPE_CHECKING:
    from pathlib import Path

    from haif.config import HaifConfig, ModelConfig
    from haif.store.rollouts import Rollout

rollout_app = typer.Typer(
    help="Rollouts: a canary version beside the stable one, its traffic weight, promote, rollback.",
    no_args_is_help=True,
)

READYZ_TIMEOUT_S = 3.0
# What `status` shows of the model's entry in a deployment's /readyz, when there.
LIVE_KEYS = ("versions", "weights", "workers_by_state")
ModelArgument = Annotated[str, typer.Argument(help="The model (its name in the config).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def _model(cfg: HaifConfig, name: str) -> ModelConfig:
    from haif.exceptions import ModelNotFound

    model = cfg.model(name)
    if model is None:
        known = ", ".join(m.name for m in cfg.models) or "none"
        raise ModelNotFound(f"no model {name!r} in the config (models: {known})")
    return model


def _record(model: ModelConfig, row: Rollout | None) -> dict[str, Any]:
    """What list and status print of a model: its rollout, or its config version at 100 %."""
    if row is None or not row.applies_to(model.version):
        return {
            "model": model.name,
            "config_version": model.version,
            "stable_version": model.version,
            "canary_version": None,
            "canary_weight": 0,
            "weights": {model.version: 100},
            "canary_status": None,
            "reason": None,
            "auto_rollbacks": 0,
            "generation": None,
            "updated_at": None,
        }
    return {
        "model": model.name,
        "config_version": model.version,
        "stable_version": row.stable_version,
        "canary_version": row.canary_version,
        "canary_weight": row.canary_weight,
        "weights": row.weights(),
        "canary_status": row.canary_status,
        "reason": row.reason,
        "auto_rollbacks": row.auto_rollbacks,
        "generation": row.generation,
        "updated_at": row.updated_at.isoformat(timespec="seconds"),
    }


def _weights(weights: dict[str, int]) -> str:
    return ", ".join(f"{version} {weight}%" for version, weight in weights.items())


@rollout_app.command("set")
def set_(
    model: ModelArgument,
    version: Annotated[
        str, typer.Option("--version", help="The canary version (of the artifact NAME:VERSION).")
    ],
    weight: Annotated[
        int, typer.Option("--weight", help="Percent of the model's requests for it, 0-100.")
    ],
    config: ConfigOption = None,
) -> None:
    """Start a canary version beside the stable one; once ready, it gets --weight percent."""
    from haif.store.rollouts import RolloutRepository

    cfg = load(config)
    with errors_to_exit():
        served = _model(cfg, model)
        artifact = served.at_version(version).artifact if version != served.version else served.artifact
    with db_session(config) as session:
        row = RolloutRepository(session).set(served.name, served.version, version, weight)
    what = f"artifact {artifact}" if artifact else "the echo runtime"
    typer.echo(f"rollout of {row.model}: {_weights(row.weights())} (generation {row.generation})")
    typer.echo(
        f"the Orchestrator starts version {version}'s workers ({what}) and sends it {weight}% "
        f"once they are ready; see `haif rollout status {row.model}`"
    )


@rollout_app.command("promote")
def promote(model: ModelArgument, config: ConfigOption = None) -> None:
    """Move 100 % to the (ready) canary, which becomes the stable version; the old one drains."""
    _conclude(model, config, "promote")


@rollout_app.command("rollback")
def rollback(model: ModelArgument, config: ConfigOption = None) -> None:
    """Return 100 % to the stable version and drop the canary; its workers drain."""
    _conclude(model, config, "rollback")


def _conclude(model: str, config: Path | None, action: Literal["promote", "rollback"]) -> None:
    """End the model's rollout one way or the other; say which version drains."""
    from haif.store.rollouts import RolloutRepository

    cfg = load(config)
    with errors_to_exit():
        served = _model(cfg, model)
    with db_session(config) as session:
        repo = RolloutRepository(session)
        before = repo.get(served.name)
        row = getattr(repo, action)(served.name, served.version)
    if action == "promote":
        drained = before.stable_version if before else served.version
        done = "promoted"
    else:
        drained = before.canary_version if before else None
        done = "rolled back"
    typer.echo(f"{done} {row.model}: version {row.stable_version} at 100% (generation {row.generation})")
    typer.echo(f"the Orchestrator drains version {drained}'s workers")


@rollout_app.command("status")
def status(model: ModelArgument, config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """The model's versions, asked weights, the canary's state and why, and the live state."""
    import json

    from haif.store.rollouts import RolloutRepository

    cfg = load(config)
    with errors_to_exit():
        served = _model(cfg, model)
    with db_session(config) as session:
        record = _record(served, RolloutRepository(session).get(served.name))
    live = _live(cfg, served.name)
    if json_out:
        typer.echo(json.dumps({**record, "live": live}, indent=2))
        return
    typer.echo(f"model: {record['model']}")
    typer.echo(f"stable version: {record['stable_version']}")
    if record["canary_version"] is None:
        typer.echo("canary: none")
    else:
        typer.echo(f"canary version: {record['canary_version']}")
        typer.echo(f"canary status: {record['canary_status'] or 'not reported yet'}")
    typer.echo(f"asked weights: {_weights(record['weights'])}")
    if record["reason"]:
        typer.echo(f"reason: {record['reason']}")
    typer.echo(f"auto rollbacks: {record['auto_rollbacks']}")
    typer.echo(f"updated: {record['updated_at'] or 'never (no rollout)'}")
    if live is None:
        typer.echo("live: no running deployment answers at the config's URL")
        return
    for key, value in live.items():
        typer.echo(f"live {key.replace('_', ' ')}: {_plain(value)}")


@rollout_app.command("list")
def list_(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Every model of the config with its versions and asked weights."""
    import json

    from haif.store.rollouts import RolloutRepository

    cfg = load(config)
    with db_session(config) as session:
        rows = {r.model: r for r in RolloutRepository(session).list()}
    records = [_record(m, rows.get(m.name)) for m in cfg.models]
    if json_out:
        typer.echo(json.dumps(records, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "stable", "canary", "weights", "canary status", "updated")
    for r in records:
        table.add_row(
            r["model"],
            r["stable_version"],
            r["canary_version"] or "",
            _weights(r["weights"]),
            r["canary_status"] or "",
            r["updated_at"] or "",
        )
    Console(width=200).print(table)


def _live(cfg: HaifConfig, model: str) -> dict[str, Any] | None:
    """The rollout side of ``model``'s entry in a running deployment's /readyz (its state and
    whichever of LIVE_KEYS it has), or None when none answers at the config's URL."""
    import httpx

    try:
        body = httpx.get(
            f"http://{cfg.server.host}:{cfg.server.port}/readyz", timeout=READYZ_TIMEOUT_S
        ).json()
    except (httpx.HTTPError, ValueError):
        return None
    models = body.get("models") if isinstance(body, dict) else None
    entry = models.get(model) if isinstance(models, dict) else None
    if not isinstance(entry, dict):
        return None
    return {k: entry[k] for k in ("state", *LIVE_KEYS) if k in entry}


def _plain(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    return str(value)
