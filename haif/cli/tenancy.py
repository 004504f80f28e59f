"""`haif tenants`, `haif tokens`, `haif quotas`, `haif usage`: the tenancy side of the operator CLI.

They talk to the metadata store of the config (``database.url``) directly, not to a
running deployment. A change to a token or a quota reaches running Gateways within
``auth.token_cache_ttl_s``.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from haif.cli._common import ConfigOption, db_session

if TYPE_CHECKING:
    from haif.store.quotas import QuotaLimits

tenants_app = typer.Typer(help="Tenants and their quotas.", no_args_is_help=True)
tokens_app = typer.Typer(
    help="API tokens (shown once at creation; stored as a hash).", no_args_is_help=True
)
quotas_app = typer.Typer(help="Quotas of a tenant.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage records (one per served job).", no_args_is_help=True)

UNLIMITED = ("unlimited", "none")
_LIMIT_HELP = "a number, or 'unlimited'"
Limit = Optional[str]  # noqa: UP045 - typer needs Optional here
RpmOption = Annotated[
    Limit, typer.Option("--requests-per-minute", help=f"Requests per minute ({_LIMIT_HELP}).")
]
TpmOption = Annotated[
    Limit, typer.Option("--tokens-per-minute", help=f"Tokens per minute ({_LIMIT_HELP}).")
]
TpdOption = Annotated[
    Limit, typer.Option("--tokens-per-day", help=f"Tokens per day ({_LIMIT_HELP}).")
]
ConcOption = Annotated[
    Limit, typer.Option("--max-concurrent", help=f"Concurrent requests ({_LIMIT_HELP}).")
]
TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant name.")]


def _limit(name: str, value: str | None) -> int | None:
    if value is None or value.strip().lower() in UNLIMITED:
        return None
    try:
        number = int(value)
    except ValueError:
        raise typer.BadParameter(f"{name} must be {_LIMIT_HELP}, not {value!r}") from None
    if number < 0:
        raise typer.BadParameter(f"{name} must be at least 0")
    return number


def _changes(**options: str | None) -> dict[str, int | None]:
    """The limits given on the command line (omitted ones are absent)."""
    return {k: _limit("--" + k.replace("_", "-"), v) for k, v in options.items() if v is not None}


def _fmt(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _describe(limits: QuotaLimits) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in limits.as_dict().items())


# --- tenants ---------------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name (letters, digits, . _ -).")],
    requests_per_minute: RpmOption = None,
    tokens_per_minute: TpmOption = None,
    tokens_per_day: TpdOption = None,
    max_concurrent: ConcOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a tenant (limits not given are unlimited)."""
    from haif.store.quotas import QuotaLimits
    from haif.store.tenants import TenantRepository

    limits = QuotaLimits(
        **_changes(
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            tokens_per_day=tokens_per_day,
            max_concurrent=max_concurrent,
        )
    )
    with db_session(config) as session:
        tenant = TenantRepository(session).create(name, limits)
        typer.echo(f"created tenant {tenant.name} (id {tenant.id}): {_describe(limits)}")


@tenants_app.command("list")
def tenants_list(
    config: ConfigOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List tenants with their limits."""
    import json

    from haif.store.quotas import QuotaLimits
    from haif.store.tenants import TenantRepository

    with db_session(config) as session:
        rows = TenantRepository(session).list()
        if json_out:
            for tenant, quota in rows:
                limits = QuotaLimits.from_row(quota) if quota else QuotaLimits()
                typer.echo(json.dumps({"id": tenant.id, "name": tenant.name, **limits.as_dict()}))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(
            "id", "name", "requests/min", "tokens/min", "tokens/day", "concurrent", "created"
        )
        for tenant, quota in rows:
            limits = QuotaLimits.from_row(quota) if quota else QuotaLimits()
            table.add_row(
                str(tenant.id),
                tenant.name,
                *(_fmt(v) for v in limits.as_dict().values()),
                tenant.created_at.isoformat(timespec="seconds"),
            )
        Console().print(table)


# --- tokens ----------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    tenant: TenantOption,
    scopes: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--scopes", help="inference, admin (repeat or comma-separate; default inference)."
        ),
    ] = None,
    models: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--models", help="Models the token may use (repeat or comma-separate; default all)."
        ),
    ] = None,
    expires_in: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            "--expires-in", min=1, help="Seconds until the token expires (default: never)."
        ),
    ] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="A label for listings.")] = None,  # noqa: UP045
    config: ConfigOption = None,
) -> None:
    """Create a token; it is printed once, as the last line, and stored only as a hash."""
    from haif.store.tenants import TenantRepository
    from haif.store.tokens import TokenRepository, parse_scopes

    allowed = sorted({m.strip() for v in models or [] for m in v.split(",") if m.strip()}) or None
    with db_session(config) as session:
        owner = TenantRepository(session).get(tenant)
        row, token = TokenRepository(session).create(
            owner,
            scopes=parse_scopes(scopes),
            allowed_models=allowed,
            expires_in_s=expires_in,
            name=name,
        )
        expires = row.expires_at.isoformat(timespec="seconds") if row.expires_at else "never"
        typer.echo(
            f"token {row.id} (prefix {row.prefix}) for tenant {tenant}: scopes={row.scopes}, "
            f"models={','.join(allowed) if allowed else 'all'}, expires={expires}"
        )
        typer.echo("store it now: it is not shown again", err=True)
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="Only this tenant's.")] = None,  # noqa: UP045
    config: ConfigOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List tokens: ids and prefixes, never secrets."""
    import json

    from haif.store.tenants import TenantRepository
    from haif.store.tokens import TokenRepository

    with db_session(config) as session:
        owner = TenantRepository(session).get(tenant) if tenant else None
        rows = TokenRepository(session).list(owner)
        now = datetime.now(UTC)
        records = [
            {
                "id": t.id,
                "prefix": t.prefix,
                "tenant": tenant_name,
                "name": t.name,
                "scopes": t.scopes,
                "models": t.allowed_models,
                "created_at": t.created_at.isoformat(timespec="seconds"),
                "expires_at": t.expires_at.isoformat(timespec="seconds") if t.expires_at else None,
                "state": "revoked"
                if t.revoked_at
                else "expired"
                if t.expires_at and t.expires_at <= now
                else "active",
            }
            for t, tenant_name in rows
        ]
    if json_out:
        for record in records:
            typer.echo(json.dumps(record))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "prefix", "tenant", "name", "scopes", "models", "expires", "state")
    for r in records:
        table.add_row(
            str(r["id"]),
            r["prefix"],
            r["tenant"],
            r["name"] or "",
            r["scopes"],
            ",".join(r["models"]) if r["models"] else "all",
            r["expires_at"] or "never",
            r["state"],
        )
    Console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    id_or_token: Annotated[
        str, typer.Argument(help="The token's id (or prefix), or the token itself.")
    ],
    config: ConfigOption = None,
) -> None:
    """Revoke a token (Gateways stop accepting it within auth.token_cache_ttl_s)."""
    from haif.store.tokens import TokenRepository

    with db_session(config) as session:
        row = TokenRepository(session).revoke(id_or_token)
        typer.echo(f"revoked token {row.id} (prefix {row.prefix})")


# --- quotas ----------------------------------------------------------------------------------


@quotas_app.command("set")
def quotas_set(
    tenant: TenantOption,
    requests_per_minute: RpmOption = None,
    tokens_per_minute: TpmOption = None,
    tokens_per_day: TpdOption = None,
    max_concurrent: ConcOption = None,
    config: ConfigOption = None,
) -> None:
    """Change a tenant's limits; those not given keep their values."""
    from haif.store.quotas import QuotaLimits
    from haif.store.tenants import TenantRepository

    changes = _changes(
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        tokens_per_day=tokens_per_day,
        max_concurrent=max_concurrent,
    )
    if not changes:
        raise typer.BadParameter("give at least one limit to set")
    with db_session(config) as session:
        quota = TenantRepository(session).set_limits(tenant, changes)
        typer.echo(f"tenant {tenant}: {_describe(QuotaLimits.from_row(quota))}")


# --- usage -----------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or an age: 30m, 24h, 7d."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(value.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"--since {value!r}: use an ISO 8601 time or an age like 24h or 7d"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@usage_app.command("export")
def usage_export(
    since: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--since", help="ISO 8601 time, or an age (30m, 24h, 7d): jobs finished since."
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="Only this tenant's.")] = None,  # noqa: UP045
    out: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of stdout.")
    ] = None,  # noqa: UP045
    config: ConfigOption = None,
) -> None:
    """Export one row per served job: tenant, model, version, job id, tokens, times."""
    import csv
    import json

    from haif.store.tenants import TenantRepository
    from haif.store.usage import EXPORT_FIELDS, export_rows

    if fmt not in ("jsonl", "csv"):
        raise typer.BadParameter("--format must be jsonl or csv")
    start = parse_since(since) if since else None
    with db_session(config) as session:
        tenant_id = TenantRepository(session).get(tenant).id if tenant else None
        stream = out.open("w", encoding="utf-8", newline="") if out else sys.stdout
        try:
            if fmt == "csv":
                writer = csv.DictWriter(stream, fieldnames=EXPORT_FIELDS, lineterminator="\n")
                writer.writeheader()
            for row in export_rows(session.connection(), start, tenant_id):
                if fmt == "csv":
                    writer.writerow(row)
                else:
                    stream.write(json.dumps(row) + "\n")
        finally:
            if out:
                stream.close()
