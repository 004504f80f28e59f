"""`haif rollout`: a canary version beside a model's stable one, its weight, promote and rollback.

The commands run over a deployment's admin API (``HAIF_URL``, ``HAIF_TOKEN``, a profile), or
on the metadata store of the config (``database.url``): either way the Orchestrator reads the
rows within a poll, starts the canary's workers and sends it its weight once they are ready
(:mod:`haif.store.rollouts`). ``status`` also shows what the running deployment reports (its
``/readyz``: at the admin API's URL, else at the config's).

Exit codes: 0 done; 1 unknown model, nothing to promote or roll back, a canary not ready,
or the store is down; 2 usage or config error (a weight outside 0..100, a model that
cannot have versions side by side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from haif.cli._common import (
    ConfigOption,
    ProfileOption,
    TokenOption,
    UrlOption,
    load,
    operations,
    print_table,
    remote_url,
)

if TYPE_CHECKING:
    from pathlib import Path

    from haif.admin.operations import Operations

rollout_app = typer.Typer(
    help="Rollouts: a canary version beside the stable one, its traffic weight, promote, rollback.",
    no_args_is_help=True,
)

READYZ_TIMEOUT_S = 3.0
# What `status` shows of the model's entry in a deployment's /readyz, when there.
LIVE_KEYS = ("versions", "weights", "workers_by_state")
ModelArgument = Annotated[str, typer.Argument(help="The model (its name in the config).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def _weights(weights: dict[str, int]) -> str:
    return ", ".join(f"{version} {weight}%" for version, weight in weights.items())


def _what(ops: Operations, config: Path | None, model: str, version: str) -> str:
    """What the canary runs, as far as the config here tells (over HTTP: the deployment's)."""
    if remote_url(ops):
        return f"version {version} of {model}"
    served = load(config).model(model)
    if served is None:
        return f"version {version} of {model}"
    artifact = served.at_version(version).artifact if version != served.version else served.artifact
    return f"artifact {artifact}" if artifact else "the echo runtime"


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
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Start a canary version beside the stable one; once ready, it gets --weight percent."""
    with operations(config, url, token, profile) as ops:
        row = ops.set_rollout(model, version, weight)
        what = _what(ops, config, row["model"], version)
    typer.echo(f"rollout of {row['model']}: {_weights(row['weights'])} (generation {row['generation']})")
    typer.echo(
        f"the Orchestrator starts version {version}'s workers ({what}) and sends it {weight}% "
        f"once they are ready; see `haif rollout status {row['model']}`"
    )


@rollout_app.command("promote")
def promote(
    model: ModelArgument,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Move 100 % to the (ready) canary, which becomes the stable version; the old one drains."""
    _conclude(model, "promote", config, url, token, profile)


@rollout_app.command("rollback")
def rollback(
    model: ModelArgument,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Return 100 % to the stable version and drop the canary; its workers drain."""
    _conclude(model, "rollback", config, url, token, profile)


def _conclude(
    model: str, action: Literal["promote", "rollback"], config: Path | None, url: str | None,
    token: str | None, profile: str | None,
) -> None:
    """End the model's rollout one way or the other; say which version drains."""
    with operations(config, url, token, profile) as ops:
        before = ops.get_rollout(model)
        row = ops.promote(model) if action == "promote" else ops.rollback(model)
    if action == "promote":
        drained, done = before["stable_version"], "promoted"
    else:
        drained, done = before["canary_version"], "rolled back"
    typer.echo(f"{done} {row['model']}: version {row['stable_version']} at 100% (generation {row['generation']})")
    typer.echo(f"the Orchestrator drains version {drained}'s workers")


@rollout_app.command("status")
def status(
    model: ModelArgument,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """The model's versions, asked weights, the canary's state and why, and the live state."""
    import json

    with operations(config, url, token, profile) as ops:
        record = ops.get_rollout(model)
        base = remote_url(ops)
    if base is None:
        cfg = load(config)
        base = f"http://{cfg.server.host}:{cfg.server.port}"
    live = _live(base, record["model"])
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
        typer.echo(f"live: no running deployment answers at {base}")
        return
    for key, value in live.items():
        typer.echo(f"live {key.replace('_', ' ')}: {_plain(value)}")


@rollout_app.command("list")
def list_(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Every model of the config with its versions and asked weights."""
    import json

    with operations(config, url, token, profile) as ops:
        records: list[dict[str, Any]] = ops.list_rollouts()["data"]
    if json_out:
        typer.echo(json.dumps(records, indent=2))
        return
    print_table(
        ("model", "stable", "canary", "weights", "canary status", "updated"),
        (
            (r["model"], r["stable_version"], r["canary_version"] or "", _weights(r["weights"]),
             r["canary_status"] or "", r["updated_at"] or "")
            for r in records
        ),
        width=200,
    )


def _live(base: str, model: str) -> dict[str, Any] | None:
    """The rollout side of ``model``'s entry in a running deployment's /readyz (its state and
    whichever of LIVE_KEYS it has), or None when none answers at ``base``."""
    import httpx

    try:
        body = httpx.get(f"{base}/readyz", timeout=READYZ_TIMEOUT_S).json()
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
