"""The `haif` command line. Heavy imports happen inside commands so `haif --help` is fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from haif.cli import db, dlq, tenancy
from haif.cli.models import keys_app, models_app
from haif.exceptions import HaifError

app = typer.Typer(help="HAIF: distributed, OpenAI-compatible AI inference.", no_args_is_help=True)
dev_app = typer.Typer(help="Development helpers.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(tenancy.tenants_app, name="tenants")
app.add_typer(tenancy.tokens_app, name="tokens")
app.add_typer(tenancy.quotas_app, name="quotas")
app.add_typer(tenancy.usage_app, name="usage")
app.add_typer(db.db_app, name="db")
app.add_typer(dlq.dlq_app, name="dlq")

ConfigOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional here
    typer.Option("--config", help="Config file (default: $HAIF_CONFIG or configs/local.yaml)."),
]


def _load(config: Path | None):  # noqa: ANN202
    from haif.config import load_config

    try:
        return load_config(config)
    except HaifError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run HAIF until Ctrl-C or SIGTERM (a local Ray cluster unless RAY_ADDRESS names one)."""
    from haif.cli.serve import run

    raise typer.Exit(run(_load(config)))


@app.command()
def status(
    config: ConfigOption = None,
    url: Annotated[Optional[str], typer.Option(help="Bridge URL (default: from config).")] = None,  # noqa: UP045
) -> None:
    """Show readiness of every model of a running deployment."""
    import httpx
    from rich.console import Console
    from rich.table import Table

    cfg = _load(config)
    base = url or f"http://{cfg.server.host}:{cfg.server.port}"
    try:
        resp = httpx.get(f"{base}/readyz", timeout=10.0)
        body = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        typer.echo(f"error: cannot reach {base}: {exc}", err=True)
        raise typer.Exit(1) from None
    table = Table("model", "state", "device", "ready workers", "error")
    for name, m in body.get("models", {}).items():
        table.add_row(name, m["state"], m["device"], f"{m['ready_workers']}/{m['workers']}", m.get("error") or "")
    Console().print(table)
    raise typer.Exit(0 if resp.status_code == 200 else 1)


@dev_app.command("build-tiny-llama")
def build_tiny_llama(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the checkpoint into.")],
    seed: Annotated[int, typer.Option(help="Random seed of weights and tokenizer.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even if a build is there.")] = False,
) -> None:
    """Build the small Llama test model (own tokenizer, chat template, head_dim 64)."""
    from haif.devmodels.tiny_llama import build_tiny_llama as build

    path = build(out, seed=seed, force=force)
    typer.echo(str(path))


if __name__ == "__main__":
    app()
