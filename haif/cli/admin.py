"""`haif admin bootstrap`: the first admin token, made on the database.

Before there is an admin token nothing can call the admin API, so this one command works on
the config's metadata store directly (as `haif db` does), never over HTTP. It is audited like
any other change, as ``cli:<os user>``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from haif.cli._common import ConfigOption, errors_to_exit, load

admin_app = typer.Typer(help="Setting up the operator plane (on the database).", no_args_is_help=True)

BOOTSTRAP_SCOPES = ["admin"]
BOOTSTRAP_TOKEN_NAME = "bootstrap"


@admin_app.command("bootstrap")
def bootstrap(
    tenant: Annotated[str, typer.Option("--tenant", help="The operators' tenant (created if missing).")],
    config: ConfigOption = None,
) -> None:
    """Create TENANT if missing and an admin token of it; the token is printed once, as the
    last line (for HAIF_TOKEN)."""
    from haif.admin.service import direct_operations
    from haif.exceptions import NotFound

    cfg = load(config)
    with errors_to_exit(), direct_operations(cfg) as ops:
        try:
            ops.get_tenant(tenant)
        except NotFound:
            ops.create_tenant(tenant, {})
            typer.echo(f"created tenant {tenant}")
        row = ops.create_token(tenant, scopes=BOOTSTRAP_SCOPES, name=BOOTSTRAP_TOKEN_NAME)
    typer.echo(f"admin token {row['id']} (prefix {row['prefix']}) for tenant {tenant}")
    typer.echo("store it now: it is not shown again", err=True)
    typer.echo(row["token"])
