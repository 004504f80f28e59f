"""`haif dlq`: list, show, replay and purge dead letters (jobs that failed finally).

Over a deployment's admin API (``HAIF_URL``, ``HAIF_TOKEN``, a profile) every command asks
the deployment. Without one, ``list``, ``show`` and ``purge`` read the DLQ of the config
directly: the Redis stream when ``redis.url`` is set, and the metadata store's table (the
embedded default, and where entries went while Redis was down); ``replay`` joins the Ray
cluster named by ``--address``, ``RAY_ADDRESS`` or ``ray.address`` and calls the Gateway's
``replay_dead_letter``. Either way the Gateway admits the entry as its tenant under its
original Idempotency-Key (a replay twice executes once), and a successful replay removes
the entry (``--keep`` keeps it).

Exit codes: 0 done; 1 not found, the replay failed, or a store is down; 2 usage or
config error (and an entry that cannot be replayed).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from haif.cli._common import (
    EXIT_FAILED,
    EXIT_USAGE,
    ConfigOption,
    ProfileOption,
    TokenOption,
    UrlOption,
    collect,
    echo_json_lines,
    errors_to_exit,
    load,
    operations,
    print_table,
    remote_or_exit,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from haif.config import HaifConfig
    from haif.dlq import DeadLetter, DeadLetterQueue

dlq_app = typer.Typer(help="Dead letters: jobs that failed finally.", no_args_is_help=True)

IdArgument = Annotated[str, typer.Argument(help="The entry's id (the job id).")]
REPLAY_MARGIN_S = 30.0  # beyond the request's own deadline, for the Ray hops


@contextmanager
def _queue(cfg: HaifConfig) -> Iterator[DeadLetterQueue]:
    from haif.dlq import DeadLetterQueue
    from haif.store import open_database

    with errors_to_exit():
        db = open_database(cfg, pool_size=1)
        dlq = DeadLetterQueue(cfg, db)
        try:
            yield dlq
        finally:
            if dlq.redis_error:
                typer.echo(
                    f"warning: {dlq.redis_error}; only the metadata store was read", err=True
                )
            dlq.close()
            db.close()


def _find(dlq: DeadLetterQueue, entry_id: str) -> DeadLetter:
    entry = dlq.get(entry_id)
    if entry is None:
        typer.echo(f"error: no dead letter {entry_id!r}", err=True)
        raise typer.Exit(EXIT_FAILED)
    return entry


@dlq_app.command("list")
def list_(
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10_000, help="Most entries shown.")
    ] = 50,
    tenant: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional here
        typer.Option("--tenant", help="Only this tenant's."),
    ] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Only this model's.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """The newest dead letters first (without their bodies: see `show`)."""
    with operations(config, url, token, profile) as ops:
        entries = collect(
            lambda cursor, size: ops.list_dead_letters(tenant=tenant, model=model, cursor=cursor, limit=size),
            limit,
        )
    if as_json:
        echo_json_lines(entries)
        return
    print_table(
        ("id", "tenant", "model", "error", "attempts", "trace id", "dead at"),
        (
            (e["id"], e["tenant"], e["model"], f"{e['error_type']} ({e['error_code']}): {e['error']}",
             e["attempts"], e.get("trace_id") or "", e["dead_at"])
            for e in entries
        ),
    )
    typer.echo(f"{len(entries)} dead letter(s)")


@dlq_app.command("show")
def show(
    entry_id: IdArgument,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """One dead letter, body included, as JSON."""
    with operations(config, url, token, profile) as ops:
        entry = ops.get_dead_letter(entry_id)
    typer.echo(json.dumps(entry, indent=2))


@dlq_app.command("replay")
def replay(
    entry_id: IdArgument,
    address: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--address", help="Ray cluster of the deployment (default: RAY_ADDRESS, ray.address)."
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the entry after a successful replay.")
    ] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Submit a dead letter again through the running deployment (its original Idempotency-Key)."""
    from haif.exceptions import HaifError, InvalidRequest

    if remote_or_exit(url, token, profile) is not None:
        with operations(config, url, token, profile) as ops:
            result = ops.replay_dead_letter(entry_id, keep=keep)
        _replayed(entry_id, result)
        return
    cfg = load(config)
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if not address:
        typer.echo("error: no cluster to replay on: pass --address or set RAY_ADDRESS", err=True)
        raise typer.Exit(EXIT_USAGE)
    with _queue(cfg) as dlq:
        entry = _find(dlq, entry_id)
        try:
            entry.request()
        except InvalidRequest as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        try:
            result = _call_gateway(cfg, address, entry)
        except HaifError as exc:
            typer.echo(f"error: the replay of {entry_id} failed: {exc.message}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        _replayed(entry_id, result)
        if not keep:
            dlq.remove(entry_id)


def _replayed(entry_id: str, result: dict) -> None:
    how = "executed" if result["executed"] else "already replayed: its stored answer stands"
    typer.echo(f"replayed {entry_id}: job {result['job_id']} {result['state']} ({how})")


def _call_gateway(cfg: HaifConfig, address: str, entry: DeadLetter) -> dict:
    """Raises: the HaifError the Gateway answered with."""
    import ray
    from ray import serve

    from haif.exceptions import HaifError, ServiceError
    from haif.handles import answer, typed

    ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
    try:
        handle = serve.get_deployment_handle("Gateway", app_name=cfg.server.app_name)
        response = handle.replay_dead_letter.remote(entry.model_dump(mode="json"))
        reply = response.result(timeout_s=cfg.server.request_timeout_s + REPLAY_MARGIN_S)
    except Exception as exc:  # noqa: BLE001 - Ray wraps the Gateway's error: map it, once
        cause = typed(exc)
        if isinstance(cause, HaifError):
            raise cause from None
        raise ServiceError(
            f"the deployment did not answer: {type(cause).__name__}: {cause}"
        ) from None
    finally:
        ray.shutdown()
    return answer(reply)  # the Gateway answers its errors as values


@dlq_app.command("purge")
def purge(
    entry_id: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional here
        typer.Argument(help="The entry to remove."),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Remove one dead letter, or all of them (--all)."""
    if (entry_id is None) == (not all_):
        typer.echo("error: give an entry id or --all (not both)", err=True)
        raise typer.Exit(EXIT_USAGE)
    with operations(config, url, token, profile) as ops:
        if all_:
            typer.echo(f"purged {ops.purge_dead_letters()['purged']} dead letter(s)")
            return
        ops.purge_dead_letter(entry_id)
    typer.echo(f"purged {entry_id}")
