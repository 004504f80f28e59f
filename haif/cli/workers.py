"""`haif workers list|drain`: the worker actors of a running deployment.

``drain`` asks the Orchestrator to drain one worker: the request is a row in the metadata
store (written by the deployment over its admin API, or here on the config's database); the
Orchestrator reads it within a poll, stops sending the worker new requests, lets it finish
what it has (within the model's drain timeout), then stops it and records the outcome.
``list`` shows the live fleet, which only a running deployment knows: it needs ``HAIF_URL``.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from haif.cli._common import (
    ConfigOption,
    JsonOption,
    LimitOption,
    ProfileOption,
    TokenOption,
    UrlOption,
    collect,
    echo_json_lines,
    needs_remote,
    operations,
    print_table,
    remote_or_exit,
)

workers_app = typer.Typer(help="Worker actors of the running deployment.", no_args_is_help=True)


@workers_app.command("list")
def list_(
    model: Annotated[Optional[str], typer.Option("--model", help="Only this model's.")] = None,  # noqa: UP045
    state: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--state", help="Only workers in this state (ready, loading, draining, ...)."),
    ] = None,
    json_out: JsonOption = False,
    limit: LimitOption = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """The workers of the running deployment: model, version, region, tier, state, load."""
    if remote_or_exit(url, token, profile) is None:
        needs_remote("`haif workers list`")  # the database holds no live fleet
    with operations(config, url, token, profile) as ops:
        workers = collect(
            lambda cursor, size: ops.list_workers(model=model, state=state, cursor=cursor, limit=size), limit
        )
    if json_out:
        echo_json_lines(workers)
        return
    print_table(
        ("id", "model", "version", "region", "tier", "state", "load / capacity", "peer"),
        (
            (w["id"], w["model"], w.get("version"), w.get("region"), w.get("tier"), w["state"],
             f"{w.get('load', 0)}/{w.get('capacity', '')}", w.get("peer"))
            for w in workers
        ),
        width=200,
    )
    typer.echo(f"{len(workers)} worker(s)")


@workers_app.command("drain")
def drain(
    worker_id: Annotated[
        str, typer.Argument(help="The worker's id, as `haif status`, spans and job rows name it.")
    ],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Drain a worker: no new requests, it finishes those it has, then it stops."""
    with operations(config, url, token, profile) as ops:
        ops.drain_worker(worker_id)
    typer.echo(
        f"drain of {worker_id} requested: the Orchestrator drains it within a few seconds "
        "(it finishes its requests first)"
    )
