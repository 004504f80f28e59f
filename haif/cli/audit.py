"""`haif audit list`: who changed what on the operator plane, newest first.

Every change made through the admin operations (over the admin API, or by the CLI on the
database) leaves an audit row: its actor (``token:ID``, ``oidc:ISSUER#SUB``, ``cli:USER``),
action, target, and the record before and after.
"""

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

audit_app = typer.Typer(help="The audit log of the operator plane.", no_args_is_help=True)

DEFAULT_ROWS = 100
Filter = Optional[str]  # noqa: UP045 - typer needs Optional here


@audit_app.command("list")
def list_(
    action: Annotated[Filter, typer.Option("--action", help="Only this action (tenant.create, ...).")] = None,
    actor: Annotated[Filter, typer.Option("--actor", help="Only this actor (token:ID, cli:USER, ...).")] = None,
    target: Annotated[Filter, typer.Option("--target", help="Only changes of this target.")] = None,
    since: Annotated[
        Filter, typer.Option("--since", help="ISO 8601 time, or an age (30m, 24h, 7d).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most rows shown.")] = DEFAULT_ROWS,
    json_out: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Audit rows, newest first: when, who, what, on which target."""
    from haif.cli.tenancy import parse_since

    start = parse_since(since) if since else None
    with operations(config, url, token, profile) as ops:
        rows = collect(
            lambda cursor, size: ops.list_audit(
                action=action, actor=actor, target=target, since=start, cursor=cursor, limit=size
            ),
            limit,
        )
    if json_out:
        echo_json_lines(rows)
        return
    print_table(
        ("id", "at", "actor", "action", "target", "request id"),
        ((r["id"], r["at"], r["actor"], r["action"], r.get("target"), r.get("request_id")) for r in rows),
        width=200,
    )
