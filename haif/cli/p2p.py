"""`haif p2p`: the P2P shim's key, and the peers (Noise public keys) mapped to tenants.

`haif p2p info` reads (or creates) the key seed in state_dir and needs no deployment;
`haif p2p peers ...` run like `haif tokens`: over a deployment's admin API (``HAIF_URL``,
``HAIF_TOKEN``, a profile), else on the metadata store of the config; a change reaches
every Gateway replica by the auth epoch (at once over the admin API, within
``auth.change_poll_s`` from the database).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

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
    errors_to_exit,
    load,
    operations,
    print_table,
)

p2p_app = typer.Typer(help="The P2P shim (Hyperswarm RPC): its key and its peers.", no_args_is_help=True)
peers_app = typer.Typer(help="P2P peers: Noise public keys mapped to tenants.", no_args_is_help=True)
p2p_app.add_typer(peers_app, name="peers")

if TYPE_CHECKING:
    from haif.config import HaifConfig

READYZ_TIMEOUT_S = 3.0
_LEGACY_SOURCE = {"store": "database"}
KeyArgument = Annotated[str, typer.Argument(help="The peer's Noise public key (64 hex characters).")]


@p2p_app.command("info")
def info(config: ConfigOption = None) -> None:
    """Print the shim's public key (from the seed in state_dir, created if missing) and its settings."""
    from haif.p2p.keys import public_key_hex

    cfg = load(config)
    seed_file = cfg.p2p_seed_path()
    with errors_to_exit():
        key = public_key_hex(seed_file)
    typer.echo(f"public key: {key}")
    typer.echo(f"seed file: {seed_file}")
    typer.echo(f"enabled: {str(cfg.p2p.enabled).lower()}")
    typer.echo(f"bootstrap: {','.join(cfg.p2p.bootstrap) if cfg.p2p.bootstrap else 'public DHT'}")
    typer.echo(f"host: {cfg.p2p.bind_host()}")
    running = _running_shim(cfg)
    if running is not None:
        typer.echo(f"shim: {running.get('state')}")
        typer.echo(f"connected peers: {running.get('inbound_peers', 0)} inbound, "
                   f"{running.get('outbound_peers', 0)} outbound")
    else:
        typer.echo("shim: no running deployment answers at the config's URL")


def _running_shim(cfg: HaifConfig) -> dict | None:
    """The running deployment's P2P shim state (its /readyz), or None."""
    import httpx

    try:
        body = httpx.get(f"http://{cfg.server.host}:{cfg.server.port}/readyz", timeout=READYZ_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return None
    p2p = body.get("p2p") if isinstance(body, dict) else None
    return p2p if isinstance(p2p, dict) else None


@peers_app.command("add")
def peers_add(
    public_key: KeyArgument,
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant the peer acts as.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Map a peer's public key to a tenant: its requests are served, billed and limited as the tenant's."""
    with operations(config, url, token, profile) as ops:
        row = ops.add_peer(public_key, tenant)
    typer.echo(f"peer {row['public_key']} -> tenant {row['tenant']}")


@peers_app.command("list")
def peers_list(
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="Only this tenant's.")] = None,  # noqa: UP045
    config: ConfigOption = None,
    json_out: JsonOption = False,
    limit: LimitOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """List peers: those added with `peers add` (source `database`) and those of `p2p.peers`
    (source `config`)."""
    with operations(config, url, token, profile) as ops:
        records = collect(lambda cursor, size: ops.list_peers(tenant=tenant, cursor=cursor, limit=size), limit)
    # The API says "store"; this command has always printed "database" for the same peers.
    records = [{**r, "source": _LEGACY_SOURCE.get(r["source"], r["source"])} for r in records]
    if json_out:
        echo_json_lines(records)
        return
    print_table(
        ("public key", "tenant", "source", "created"),
        ((r["public_key"], r["tenant"], r["source"], r.get("created_at") or "") for r in records),
        width=200,
    )


@peers_app.command("remove")
def peers_remove(
    public_key: KeyArgument,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    profile: ProfileOption = None,
) -> None:
    """Remove a peer added with `haif p2p peers add` (refused everywhere within a second)."""
    with operations(config, url, token, profile) as ops:
        row = ops.remove_peer(public_key)
    typer.echo(f"removed peer {row['public_key']}")


@p2p_app.command("worker")
def worker(
    model: Annotated[str, typer.Option("--model", help="The model of the config to serve.")],
    allow: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer needs Optional here
        typer.Option("--allow", help="A peer it serves (the HAIF shim's public key); repeatable. None: any peer."),
    ] = None,
    seed_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--seed-file", help="Its key seed (default: state_dir/p2p/worker-MODEL.seed)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Serve a model to HAIF as a remote P2P worker: prints its public key, for `p2p_workers`."""
    import asyncio
    import signal

    from haif.p2p.keys import parse_public_key
    from haif.p2p.worker import serve_worker

    cfg = load(config)
    with errors_to_exit():
        allowed = frozenset(parse_public_key(k) for k in allow or [])
    if not allowed:
        typer.echo("warning: no --allow: any peer that knows this worker's key may use it", err=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(cfg, model, allowed, stop, seed_file)

    with errors_to_exit():
        asyncio.run(run())
