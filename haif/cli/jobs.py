"""`haif jobs list`: the jobs (requests) the deployment admitted, newest first."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from haif.cli._common import (
    ConfigOption,
    JsonOption,
    ProfileOption,
    TokenOption,
    UrlOption,
    collect,
    echo_json_lines,
    operations,
    print_table,
)

jobs_app = typer.Typer(help="Jobs: the requests HAIF admitted, their state and tokens.", no_args_is_help=True)

DEFAULT_ROWS = 100
Filter = Optional[str]  # noqa: UP045 - typer needs Optional here


@jobs_app.command("list")
def list_(
    tenant: Annotated[Filter, typer.Option("--tenant", help="Only this tenant's.")] = None,
    state: Annotated[
        Filter, typer.Option("--state", help="Only jobs in this state (reserved, running, succeeded, failed, dead_lettered).")
    ] = None,
    model: Annotated[Filter, typer.Option("--model", help="Only this model's.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most rows shown.")] = DEFAULT_ROWS,
    json_out: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Jobs, newest first: tenant, model and version, state, tokens, worker, times."""
    with operations(config, url, token, profile) as ops:
        rows = collect(
            lambda cursor, size: ops.list_jobs(
                tenant=tenant, state=state, model=model, cursor=cursor, limit=size
            ),
            limit,
        )
    if json_out:
        echo_json_lines(rows)
        return
    print_table(
        ("id", "tenant", "kind", "model", "state", "tokens in/out", "worker", "created", "finished",
         "error"),
        (
            (j["id"], j["tenant"], j.get("kind"),
             f"{j['model']}:{j['version']}" if j.get("version") else j.get("model"), j["state"],
             f"{j.get('prompt_tokens') or 0}/{j.get('completion_tokens') or 0}", j.get("worker"),
             j.get("created_at"), j.get("finished_at"), j.get("error"))
            for j in rows
        ),
        width=200,
    )
