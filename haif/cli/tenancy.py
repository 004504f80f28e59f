"""`haif tenants`, `haif tokens`, `haif quotas`, `haif usage`: the tenancy side of the operator CLI.

They run over a deployment's admin API when given its URL and a token (``HAIF_URL``,
``HAIF_TOKEN``, a profile), else on the metadata store of the config (``database.url``).
A change to a token, a quota or a tenant reaches every running Gateway replica by the auth
epoch: at once over the admin API, within ``auth.change_poll_s`` from the database.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

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
    operations,
    print_table,
)

if TYPE_CHECKING:
    from haif.admin.operations import Record

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


class Priority(str, Enum):
    high = "high"
    normal = "normal"
    low = "low"


PriorityOption = Annotated[
    Optional[Priority],  # noqa: UP045
    typer.Option("--priority", help="high, normal or low: stored with the tenant (scheduling by it is not done yet)."),
]
QUOTAS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")


def _describe(tenant: Record) -> str:
    """The tenant's limits (and priority, when the record has one), ``key=value, ...``."""
    text = ", ".join(f"{k}={_fmt(tenant.get(k))}" for k in QUOTAS)
    return f"{text}, priority={tenant['priority']}" if tenant.get("priority") else text



# --- tenants ---------------------------------------------------------------------------------

NameArgument = Annotated[str, typer.Argument(help="Tenant name.")]


def _quota_changes(
    requests_per_minute: str | None, tokens_per_minute: str | None, tokens_per_day: str | None,
    max_concurrent: str | None,
) -> dict[str, int | None]:
    return _changes(
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        tokens_per_day=tokens_per_day,
        max_concurrent=max_concurrent,
    )


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name (letters, digits, . _ -).")],
    requests_per_minute: RpmOption = None,
    tokens_per_minute: TpmOption = None,
    tokens_per_day: TpdOption = None,
    max_concurrent: ConcOption = None,
    priority: PriorityOption = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Create a tenant (limits not given are unlimited; priority normal unless given)."""
    limits = _quota_changes(requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent)
    with operations(config, url, token, profile) as ops:
        tenant = ops.create_tenant(name, limits, priority.value if priority else None)
    typer.echo(f"created tenant {tenant['name']} (id {tenant['id']}): {_describe(tenant)}")


@tenants_app.command("list")
def tenants_list(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    limit: LimitOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """List tenants with their limits, priority and whether they are suspended."""
    with operations(config, url, token, profile) as ops:
        tenants = collect(lambda cursor, size: ops.list_tenants(cursor=cursor, limit=size), limit)
    if json_out:
        # The shape `haif tenants list --json` has always had; `tenants show` has the rest.
        echo_json_lines({"id": t["id"], "name": t["name"], **{k: t.get(k) for k in QUOTAS}} for t in tenants)
        return
    print_table(
        ("id", "name", "requests/min", "tokens/min", "tokens/day", "concurrent", "priority", "suspended",
         "created"),
        (
            (t["id"], t["name"], *(_fmt(t.get(k)) for k in QUOTAS), t.get("priority") or "normal",
             "yes" if t.get("suspended") else "no", t.get("created_at"))
            for t in tenants
        ),
    )


@tenants_app.command("show")
def tenants_show(
    name: NameArgument,
    config: ConfigOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """One tenant: its limits, priority, whether it is suspended, when it was created."""
    import json

    with operations(config, url, token, profile) as ops:
        tenant = ops.get_tenant(name)
    if json_out:
        typer.echo(json.dumps(tenant, indent=2))
        return
    for key, value in tenant.items():
        shown = _fmt(value) if key in QUOTAS else value
        typer.echo(f"{key.replace('_', ' ')}: {'' if shown is None else shown}")


@tenants_app.command("update")
def tenants_update(
    name: NameArgument,
    requests_per_minute: RpmOption = None,
    tokens_per_minute: TpmOption = None,
    tokens_per_day: TpdOption = None,
    max_concurrent: ConcOption = None,
    priority: PriorityOption = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Change a tenant's limits or priority; what is not given keeps its value."""
    changes: dict[str, Any] = dict(
        _quota_changes(requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent)
    )
    if priority is not None:
        changes["priority"] = priority.value
    if not changes:
        raise typer.BadParameter("give at least one limit or --priority to change")
    with operations(config, url, token, profile) as ops:
        tenant = ops.update_tenant(name, changes)
    typer.echo(f"tenant {tenant['name']}: {_describe(tenant)}")


@tenants_app.command("suspend")
def tenants_suspend(
    name: NameArgument,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Suspend a tenant: its requests are refused (403) until `resume`; nothing is deleted."""
    with operations(config, url, token, profile) as ops:
        ops.update_tenant(name, {"suspended": True})
    typer.echo(f"suspended tenant {name}: every Gateway replica refuses its requests (403) within a second")


@tenants_app.command("resume")
def tenants_resume(
    name: NameArgument,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Resume a suspended tenant: its tokens work again."""
    with operations(config, url, token, profile) as ops:
        ops.update_tenant(name, {"suspended": False})
    typer.echo(f"resumed tenant {name}")


# --- tokens ----------------------------------------------------------------------------------


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values, in order, without repeats (None: none given)."""
    out = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return list(dict.fromkeys(out)) or None


def _scopes(value: object) -> str:
    """A token's scopes as they have always printed: space-separated."""
    return " ".join(value) if isinstance(value, list) else str(value)


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
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Create a token; it is printed once, as the last line, and stored only as a hash."""
    allowed = sorted(_split(models) or []) or None
    with operations(config, url, token, profile) as ops:
        row = ops.create_token(tenant, scopes=_split(scopes), models=allowed, expires_in_s=expires_in, name=name)
    typer.echo(
        f"token {row['id']} (prefix {row['prefix']}) for tenant {row.get('tenant', tenant)}: "
        f"scopes={_scopes(row['scopes'])}, models={','.join(row['models']) if row.get('models') else 'all'}, "
        f"expires={row.get('expires_at') or 'never'}"
    )
    typer.echo("store it now: it is not shown again", err=True)
    typer.echo(row["token"])


@tokens_app.command("list")
def tokens_list(
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="Only this tenant's.")] = None,  # noqa: UP045
    state: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--state", help="Only tokens in this state: active, expired or revoked."),
    ] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    limit: LimitOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """List tokens: ids and prefixes, never secrets."""
    with operations(config, url, token, profile) as ops:
        records = collect(
            lambda cursor, size: ops.list_tokens(tenant=tenant, state=state, cursor=cursor, limit=size), limit
        )
    records = [{**r, "scopes": _scopes(r["scopes"])} for r in records]
    if json_out:
        echo_json_lines(records)
        return
    print_table(
        ("id", "prefix", "tenant", "name", "scopes", "models", "expires", "state"),
        (
            (r["id"], r["prefix"], r["tenant"], r.get("name") or "", r["scopes"],
             ",".join(r["models"]) if r.get("models") else "all", r.get("expires_at") or "never", r["state"])
            for r in records
        ),
    )


@tokens_app.command("revoke")
def tokens_revoke(
    id_or_token: Annotated[
        str, typer.Argument(help="The token's id (or prefix), or the token itself.")
    ],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Revoke a token: every Gateway replica refuses it within a second."""
    with operations(config, url, token, profile) as ops:
        row = ops.revoke_token(id_or_token)
    typer.echo(f"revoked token {row['id']} (prefix {row['prefix']})")


# --- quotas ----------------------------------------------------------------------------------


@quotas_app.command("set")
def quotas_set(
    tenant: TenantOption,
    requests_per_minute: RpmOption = None,
    tokens_per_minute: TpmOption = None,
    tokens_per_day: TpdOption = None,
    max_concurrent: ConcOption = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Change a tenant's limits; those not given keep their values."""
    changes = _quota_changes(requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent)
    if not changes:
        raise typer.BadParameter("give at least one limit to set")
    with operations(config, url, token, profile) as ops:
        row = ops.update_tenant(tenant, dict(changes))
    typer.echo(f"tenant {tenant}: {', '.join(f'{k}={_fmt(row.get(k))}' for k in QUOTAS)}")


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
        parsed = datetime.fromisoformat(value.strip())
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
    ] = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Export one row per served job: tenant, model, version, job id, tokens, times."""
    import csv
    import json
    from itertools import chain

    from haif.admin.client import iter_pages
    from haif.admin.operations import MAX_PAGE
    from haif.store.usage import EXPORT_FIELDS

    if fmt not in ("jsonl", "csv"):
        raise typer.BadParameter("--format must be jsonl or csv")
    start = parse_since(since) if since else None
    with operations(config, url, token, profile) as ops:
        rows = iter_pages(
            lambda cursor: ops.list_usage(tenant=tenant, since=start, cursor=cursor, limit=MAX_PAGE)
        )
        first = next(rows, None)  # an unknown tenant fails here, before a file is written
        stream = out.open("w", encoding="utf-8", newline="") if out else sys.stdout
        try:
            writer = csv.DictWriter(stream, fieldnames=EXPORT_FIELDS, lineterminator="\n") if fmt == "csv" else None
            if writer is not None:
                writer.writeheader()
            for row in chain([] if first is None else [first], rows):
                if writer is not None:
                    writer.writerow({k: row.get(k) for k in EXPORT_FIELDS})
                else:
                    stream.write(json.dumps(row) + "\n")
        finally:
            if out:
                stream.close()
