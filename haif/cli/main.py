"""The `haif` command line. Heavy imports happen inside commands so `haif --help` is fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from haif.cli import admin, audit, db, dlq, jobs, p2p, rollout, tenancy, workers
from haif.cli._common import ConfigOption, load
from haif.cli.models import keys_app, models_app

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
app.add_typer(p2p.p2p_app, name="p2p")
app.add_typer(rollout.rollout_app, name="rollout")
app.add_typer(workers.workers_app, name="workers")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(admin.admin_app, name="admin")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run HAIF until Ctrl-C or SIGTERM (a local Ray cluster unless RAY_ADDRESS names one)."""
    from haif.cli.serve import run

    raise typer.Exit(run(load(config)))


@app.command()
def status(
    config: ConfigOption = None,
    url: Annotated[Optional[str], typer.Option(help="HAIF's URL (default: from config).")] = None,  # noqa: UP045
) -> None:
    """Every model of a running deployment: readiness, versions and their traffic weights,
    workers by version, state and region, ongoing requests, the autoscaler's last decision."""
    import httpx
    from rich.console import Console
    from rich.table import Table

    cfg = load(config)
    base = url or f"http://{cfg.server.host}:{cfg.server.port}"
    try:
        resp = httpx.get(f"{base}/readyz", timeout=10.0)
        body = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        typer.echo(f"error: cannot reach {base}: {exc}", err=True)
        raise typer.Exit(1) from None
    table = Table("model", "state", "device", "ready workers", "versions (weight %)", "workers by state",
                  "ongoing", "autoscaler", "error")
    for name, m in body.get("models", {}).items():
        weights = m.get("weights") or {}
        versions = ", ".join(f"{v} ({weights.get(v, 0)})" for v in sorted(set(weights) | set(m.get("versions") or {})))
        by_state = "; ".join(
            f"{v}: " + ", ".join(
                f"{n} {s}" for s, n in sorted(info.get("workers_by_state", {}).items())
            ) + " in " + ", ".join(f"{r} {n}" for r, n in sorted(info.get("workers_by_region", {}).items()))
            for v, info in sorted((m.get("versions") or {}).items())
        )
        if m.get("scaled_to_zero"):
            by_state = "scaled to zero"
        table.add_row(
            name, m["state"], m["device"], f"{m['ready_workers']}/{m['workers']}", versions, by_state,
            str(m.get("ongoing", "")), m.get("autoscaler") or "", m.get("error") or "",
        )
    Console(width=200).print(table)
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


@dev_app.command("build-tiny-lora")
def build_tiny_lora(
    base: Annotated[Path, typer.Option("--base", help="The tiny-llama checkpoint it adapts.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the adapter into.")],
    seed: Annotated[int, typer.Option(help="Random seed of its matrices.")] = 0,
) -> None:
    """Build a PEFT LoRA adapter of tiny-llama (seeded, non-zero weights: it changes the output)."""
    from haif.devmodels.tiny_llama import build_tiny_lora as build

    typer.echo(str(build(out, base, seed=seed)))


if __name__ == "__main__":
    app()
