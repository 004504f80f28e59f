"""`haif models` (publish, list, verify, pull, repair) and `haif keys` (generate).

Heavy imports (fsspec, s3fs, cryptography) happen inside the commands. Progress bars go
to stderr, results to stdout. Exit codes: 0 success; 1 the artifact failed (refused,
corrupt everywhere, quorum not reached, ...); 2 a usage or config error; 3 (verify
only) the artifact is usable but some replica copies are bad or missing: run repair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from haif.cli._common import EXIT_FAILED, EXIT_USAGE, ConfigOption, load
from haif.exceptions import ArtifactError, HaifError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from haif.artifacts import ArtifactRef, ArtifactStore, SigningKey, TrustPolicy
    from haif.artifacts.manifest import AdapterOf
    from haif.artifacts.reports import ListedArtifact
    from haif.config import HaifConfig

models_app = typer.Typer(
    help="Signed model artifacts: publish, list, verify, pull, repair.", no_args_is_help=True
)
keys_app = typer.Typer(help="Ed25519 signing keys for artifacts.", no_args_is_help=True)

EXIT_DEGRADED = 3  # verify only: usable, but some replica copies are bad or missing
_UNBOUNDED = 1 << 16  # columns to measure a table's natural width in (names are <= 128)
RefArgument = Annotated[str, typer.Argument(help="`name:version` or `sha256:<manifest digest>`.")]


class _RichProgress:
    """rich progress bars behind the store's ``Progress`` protocol (thread-safe)."""

    def __init__(self, progress: object) -> None:
        self._progress = progress

    def task(self, description: str, total: int) -> Callable[[int], None]:
        progress = self._progress
        task_id = progress.add_task(description, total=max(total, 1))  # type: ignore[attr-defined]
        if total == 0:
            progress.update(task_id, completed=1)  # type: ignore[attr-defined]
        return lambda n: progress.advance(task_id, n)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _progress() -> Iterator[_RichProgress]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_console(stderr=True),
    ) as progress:
        yield _RichProgress(progress)


def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def _table(*headers: str) -> Table:
    """A results table whose cells are never wrapped, folded or cut (see ``_print``)."""
    from rich.table import Table

    table = Table()
    for header in headers:
        table.add_column(header, no_wrap=True)
    return table


def _print(table: Table) -> None:
    """Print ``table`` at its natural width, even when that is wider than the terminal.

    Its cells are names, refs, digests and replica URLs that people copy and grep: a
    too-narrow terminal wraps the line but the text stays whole (rich would otherwise
    shrink the columns to the width, 80 when piped, and cut every cell with "...").
    """
    from rich.measure import Measurement

    console = _console()
    natural = Measurement.get(console, console.options.update_width(_UNBOUNDED), table).maximum
    console.width = max(console.width, natural)
    console.print(table)


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _ref(text: str) -> ArtifactRef:
    from haif.artifacts import ArtifactRef

    try:
        return ArtifactRef.parse(text)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None


def _store_and_trust(
    cfg: HaifConfig, trusted_key: str | None = None
) -> tuple[ArtifactStore, TrustPolicy]:
    from haif.artifacts import ArtifactStore, load_public_key
    from haif.artifacts.trust import trusted_keys

    base = cfg.base_path()
    try:
        # The policy the server and its workers load with (the development key included).
        trust = trusted_keys(cfg.artifacts, base)
        if trusted_key is not None:
            trust = trust.with_keys([load_public_key(trusted_key, Path.cwd())])
        return ArtifactStore.from_config(cfg.artifacts, base), trust
    except HaifError as exc:
        raise _fail(exc.message, EXIT_USAGE) from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# --- keys --------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    out: Annotated[
        Path, typer.Option("--out", help="Private key file; the public key goes to PATH.pub.")
    ],
    force: Annotated[bool, typer.Option(help="Replace an existing key.")] = False,
    config: ConfigOption = None,  # noqa: ARG001 - every command takes --config
) -> None:
    """Generate an Ed25519 signing key pair (PKCS#8 PEM, mode 0600; public key in PATH.pub)."""
    from haif.artifacts import SigningKey
    from haif.artifacts.keys import public_path

    key = SigningKey.generate()
    try:
        key.save(out, overwrite=force)
    except FileExistsError:
        raise _fail(f"{out} exists; pass --force to replace it", EXIT_USAGE) from None
    typer.echo(f"private key: {out}")
    typer.echo(f"public key:  {public_path(out)}")
    typer.echo(f"key id:      {key.key_id}")
    typer.echo(key.public_key.text())


# --- models ------------------------------------------------------------------------


@models_app.command("publish")
def publish(
    directory: Annotated[
        str, typer.Argument(metavar="DIR", help="Model directory or python-package:PKG/SUBDIR.")
    ],
    name: Annotated[str, typer.Option("--name", help="Artifact name.")],
    version: Annotated[
        str, typer.Option("--version", help="Artifact version (immutable once published).")
    ],
    key: Annotated[
        Path, typer.Option("--key", help="Ed25519 private key that signs the manifest.")
    ],
    runtime: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Runtime hint recorded in the manifest (torch, embeddings, vllm, echo)."),
    ] = None,
    base: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--base", metavar="MODEL_ARTIFACT",
            help="DIR is a PEFT LoRA adapter of this model artifact (name:version or sha256:...): "
            "the signed manifest records it and the base's manifest digest.",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Publish DIR as NAME:VERSION to every replica (streamed, deduplicated, write quorum)."""
    from haif.artifacts import load_signing_key
    from haif.config import resolve_source

    cfg = load(config)
    ref = _ref(f"{name}:{version}")
    try:
        source = resolve_source(directory, Path.cwd())
        signing_key = load_signing_key(key)
    except HaifError as exc:
        raise _fail(exc.message, EXIT_USAGE) from None
    if not source.is_dir():
        raise _fail(f"{source} is not a directory", EXIT_USAGE)
    store, trust = _store_and_trust(cfg)
    try:
        adapter = _adapter_of(store, trust, signing_key, source, base) if base else None
        with _progress() as progress:
            report = store.publish(
                source,
                ref.name or "",
                ref.version or "",
                signing_key,
                runtime={"runtime": runtime} if runtime else None,
                trust=trust,
                progress=progress,
                adapter=adapter,
            )
    except ArtifactError as exc:
        raise _fail(exc.message) from None
    table = _table("replica", "result", "blobs written", "bytes written")
    for o in report.outcomes:
        table.add_row(
            o.replica,
            "ok" if o.ok else f"FAILED: {o.error}",
            str(o.blobs_written),
            _size(o.bytes_written),
        )
    _print(table)
    typer.echo(
        f"published {report.ref}: {report.files} files, {_size(report.total_bytes)}, "
        f"{report.ok_replicas}/{len(report.outcomes)} replicas (quorum {store.write_quorum})"
    )
    typer.echo(f"manifest: sha256:{report.manifest_digest}")
    typer.echo(f"signer: {report.signer}")
    if adapter is not None:
        typer.echo(f"adapter of: {adapter.base} (manifest sha256:{adapter.base_manifest})")


def _adapter_of(
    store: ArtifactStore, trust: TrustPolicy, key: SigningKey, source: Path, base: str
) -> AdapterOf:
    """What an adapter's manifest records of its base, once DIR is a LoRA directory and the
    base a model trusted here (or signed by the publishing key)."""
    from haif.runtimes.lora import read_adapter

    try:
        read_adapter(source, str(source))
    except HaifError as exc:
        raise _fail(exc.message, EXIT_USAGE) from None
    return store.adapter_of(_ref(base), trust.also(key.public_key))


@models_app.command("list")
def list_models(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print a JSON list of objects (ref, manifest_digest, files, total_bytes, "
            "signer, created_at, replicas, and base / base_manifest: an adapter's base model, "
            "else null), unabridged, for scripts.",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Every published name:version and the replicas that hold it; LoRA adapters under their base."""
    cfg = load(config)
    store, _ = _store_and_trust(cfg)
    artifacts = store.list()
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps([dataclasses.asdict(a) for a in artifacts], indent=2))
        return
    table = _table("artifact", "manifest", "files", "size", "signer", "created", "replicas")
    for a, label in _under_bases(artifacts):
        table.add_row(
            label,
            f"sha256:{a.manifest_digest[:16]}",
            str(a.files),
            _size(a.total_bytes),
            a.signer[:16],
            a.created_at,
            f"{len(a.replicas)}/{len(store.replicas)}",
        )
    _print(table)


def _under_bases(artifacts: list[ListedArtifact]) -> list[tuple[ListedArtifact, str]]:
    """Each artifact and its label: models in order, each followed by its adapters (indented);
    adapters whose base this store does not hold come last, naming it."""
    adapters: dict[str, list[ListedArtifact]] = {}
    for a in artifacts:
        if a.base_manifest is not None:
            adapters.setdefault(a.base_manifest, []).append(a)
    out: list[tuple[ListedArtifact, str]] = []
    for a in artifacts:
        if a.base_manifest is None:
            out.append((a, a.ref))
            children = adapters.pop(a.manifest_digest, [])
            out += [(child, f"  └ {child.ref} (adapter)") for child in children]
    for orphans in adapters.values():
        out += [(a, f"{a.ref} (adapter of {a.base}, not in this store)") for a in orphans]
    return out


@models_app.command("verify")
def verify(
    ref: RefArgument,
    trusted_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--trusted-key", help="Check against this public key (file or ed25519:...) only."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Check the signature and hash every blob on every replica (exit 0 only if all check out)."""
    cfg = load(config)
    artifact = _ref(ref)
    store, trust = _store_and_trust(cfg, trusted_key)
    with _progress() as progress:
        report = store.verify(artifact, trust, progress)
    table = _table("replica", "manifest", "blobs ok")
    for label, status in report.manifest_status.items():
        ok = sum(b.status.get(label) == "ok" for b in report.blobs)
        table.add_row(label, status, f"{ok}/{len(report.blobs)}" if report.blobs else "-")
    _print(table)
    if report.manifest is None:
        raise _fail(
            report.error.message if report.error else f"artifact {artifact}: no trusted manifest"
        )
    for problem in report.problems():
        typer.echo(f"problem: {problem}")
    if not report.valid:
        raise _fail(f"artifact {artifact}: some blobs have no good copy in any replica")
    if not report.clean:
        raise _fail(
            f"artifact {artifact} is usable but degraded; run `haif models repair {artifact}`",
            EXIT_DEGRADED,
        )
    typer.echo(
        f"verified {report.ref} (sha256:{report.manifest_digest}): signature and "
        f"{len(report.blobs)} blobs ok on {len(report.manifest_status)} replicas"
    )


@models_app.command("pull")
def pull_model(ref: RefArgument, config: ConfigOption = None) -> None:
    """Pull into this node's cache, verifying the signature and every blob; print the directory."""
    from haif.artifacts import NodeCache, pull

    cfg = load(config)
    artifact = _ref(ref)
    store, trust = _store_and_trust(cfg)
    cache = NodeCache.from_config(cfg.artifacts, cfg.base_path())
    try:
        with _progress() as progress:
            pulled = pull(store, cache, artifact, trust, progress=progress)
    except ArtifactError as exc:
        raise _fail(exc.message) from None
    pulled.release()
    summary = pulled.summary()
    typer.echo(
        f"pulled {summary['name']} (manifest {summary['manifest_digest']}): "
        f"{summary['blobs_fetched']} blobs fetched ({_size(summary['bytes_fetched'])}), "
        f"{summary['blobs_hit']} from the node cache"
    )
    for source, count in summary["sources"].items():
        typer.echo(f"  {count} blob(s) from {source}")
    typer.echo(str(pulled.path))


@models_app.command("repair")
def repair(ref: RefArgument, config: ConfigOption = None) -> None:
    """Re-copy bad or missing blobs and manifests from a good replica."""
    cfg = load(config)
    artifact = _ref(ref)
    store, trust = _store_and_trust(cfg)
    try:
        with _progress() as progress:
            report = store.repair(artifact, trust, progress)
    except ArtifactError as exc:
        raise _fail(exc.message) from None
    for item in report.fixed:
        typer.echo(f"repaired: {item}")
    for item in report.unrepairable:
        typer.echo(f"NOT repaired: {item}")
    if not report.after.clean:
        raise _fail(f"artifact {artifact} still has problems: {'; '.join(report.after.problems())}")
    typer.echo(
        f"{report.ref}: every replica holds the manifest and every blob "
        f"({len(report.fixed)} repaired)"
    )
