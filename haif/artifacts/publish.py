"""Publishing a model directory to a store's replicas at its write quorum.

The directory is hashed in one streamed pass (copied meanwhile into each local
replica's staging area), the manifest signed (or an identical one reused), then every
replica gets the blobs it lacks and the manifest, in parallel. ``ArtifactStore.publish``
is the entry point; this module holds its steps and sees the store only as a
``PublishTarget`` (it imports nothing of ``store``).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from haif.artifacts._io import hash_file
from haif.artifacts.manifest import ArtifactRef, FileEntry, Manifest, SignedManifest, sign_manifest
from haif.artifacts.reports import PublishReport, ReplicaOutcome
from haif.exceptions import (
    ArtifactConflict,
    ArtifactCorrupt,
    ArtifactError,
    ArtifactNotFound,
    QuorumNotReached,
)

if TYPE_CHECKING:
    from haif.artifacts.keys import SigningKey, TrustPolicy
    from haif.artifacts.manifest import AdapterOf
    from haif.artifacts.replicas import Replica
    from haif.artifacts._io import Progress, TransferStats

logger = logging.getLogger("haif.artifacts")


class PublishTarget(Protocol):
    """What publishing needs of a store (``ArtifactStore`` is one)."""

    replicas: list[Replica]
    write_quorum: int
    chunk_bytes: int
    stats: TransferStats

    def manifest_at(self, replica: Replica, ref: ArtifactRef) -> SignedManifest | None: ...


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes when a file's bytes change (inode, size, mtime, ctime)."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def scan_dir(source: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``source`` as ``(posix relative path, path)``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                out.append((path.relative_to(source).as_posix(), path))
    return out


def publish_dir(
    store: PublishTarget,
    source: Path,
    name: str,
    version: str,
    key: SigningKey,
    *,
    runtime: dict[str, str] | None = None,
    trust: TrustPolicy | None = None,
    progress: Progress | None = None,
    adapter: AdapterOf | None = None,
) -> PublishReport:
    """Publish the files of ``source`` to ``store`` (see ``ArtifactStore.publish``)."""
    ref = ArtifactRef.parse(f"{name}:{version}")
    files = scan_dir(source)
    if not files:
        raise ArtifactNotFound(f"nothing to publish: {source} holds no file")
    staged: dict[str, dict[str, Path]] = {r.label: {} for r in store.replicas if r.local}
    try:
        entries, local = _hash_and_stage(store, files, staged, progress, ref)
        manifest = Manifest(
            name=name,
            version=version,
            files=tuple(entries),
            signer=key.key_id,
            runtime=dict(runtime or {}),
            adapter=adapter,
        )
        signed = _reuse_or_sign(store, ref, manifest, key, trust)
        with ThreadPoolExecutor(
            max_workers=len(store.replicas), thread_name_prefix="haif-publish"
        ) as pool:
            outcomes = list(
                pool.map(
                    lambda r: _publish_to(
                        store, r, signed, local, staged.get(r.label, {}), progress
                    ),
                    store.replicas,
                )
            )
    finally:
        for copies in staged.values():
            for tmp in copies.values():
                tmp.unlink(missing_ok=True)
    report = PublishReport(
        ref=str(ref),
        manifest_digest=signed.digest,
        files=len(entries),
        total_bytes=manifest.total_bytes,
        signer=signed.key_id,
        outcomes=outcomes,
    )
    if report.ok_replicas < store.write_quorum:
        failed = "; ".join(f"{o.replica}: {o.error}" for o in outcomes if not o.ok)
        raise QuorumNotReached(
            f"artifact {ref}: written to {report.ok_replicas} of {len(outcomes)} replicas, "
            f"write quorum is {store.write_quorum} ({failed})"
        )
    return report


def _hash_and_stage(
    store: PublishTarget,
    files: list[tuple[str, Path]],
    staged: dict[str, dict[str, Path]],
    progress: Progress | None,
    ref: ArtifactRef,
) -> tuple[list[FileEntry], dict[str, tuple[Path, tuple[int, ...]]]]:
    """Hash every file; meanwhile copy it into each local replica's staging area.

    The copies run in the kernel on other cores, so a local publish costs about one
    pass instead of two. A staged copy of a blob the replica already has is dropped.
    """
    local_replicas = [r for r in store.replicas if r.label in staged]
    total = sum(p.stat().st_size for _, p in files)
    advance = progress.task(f"hash {ref}", total) if progress else None
    entries: list[FileEntry] = []
    local: dict[str, tuple[Path, tuple[int, ...]]] = {}
    with ThreadPoolExecutor(
        max_workers=max(1, len(local_replicas)), thread_name_prefix="haif-stage"
    ) as pool:
        for rel, path in files:
            stamp = _stamp(path)
            copies = {
                r.label: pool.submit(r.stage_file, path, store.chunk_bytes)
                for r in local_replicas
            }
            digest, size = hash_file(path, store.chunk_bytes, on_bytes=advance)
            for label, copy in copies.items():
                try:
                    tmp = copy.result()
                except OSError as exc:  # that replica's own write reports it, without a staged copy
                    logger.warning("cannot stage %s in %s: %s", path, label, exc)
                    continue
                if digest in staged[label]:
                    tmp.unlink()  # the same bytes under another path: one blob
                else:
                    staged[label][digest] = tmp
            if _stamp(path) != stamp:
                raise ArtifactCorrupt(f"{path} changed while it was being hashed")
            entries.append(FileEntry(path=rel, digest=digest, size=size))
            local.setdefault(digest, (path, stamp))
    return entries, local


def _reuse_or_sign(
    store: PublishTarget,
    ref: ArtifactRef,
    manifest: Manifest,
    key: SigningKey,
    trust: TrustPolicy | None,
) -> SignedManifest:
    from haif.artifacts.keys import TrustPolicy

    # What counts as "already published": a manifest that verifies under the trust
    # policy or the publishing key. Anything else at that path is garbage to overwrite.
    policy = TrustPolicy(
        global_keys=(*(trust.keys_for(ref.name).values() if trust else ()), key.public_key)
    )
    for replica in store.replicas:
        try:
            existing = store.manifest_at(replica, ref)
            if existing is None:
                continue
            existing.verify(policy, where=replica.label)
        except ArtifactError:
            continue
        except Exception as exc:  # an unreachable replica is reported by the write below
            logger.warning("cannot read %s from %s: %s", ref, replica.label, exc)
            continue
        if not existing.manifest.same_content(manifest):
            raise ArtifactConflict(
                f"artifact {ref} is already published with other content "
                f"(manifest sha256:{existing.digest}); publish a new version"
            )
        if existing.key_id == key.key_id:
            return existing  # the very same manifest: nothing to re-sign
    return sign_manifest(manifest, key)


def _publish_to(
    store: PublishTarget,
    replica: Replica,
    signed: SignedManifest,
    local: dict[str, tuple[Path, tuple[int, ...]]],
    staged: dict[str, Path],
    progress: Progress | None,
) -> ReplicaOutcome:
    outcome = ReplicaOutcome(replica=replica.label, ok=False)
    manifest = signed.manifest
    missing = {}
    try:
        for digest, size in manifest.blobs().items():
            if replica.size(replica.blob_path(digest)) != size:
                missing[digest] = size
        advance = (
            progress.task(f"publish → {replica.label}", sum(missing.values()))
            if progress
            else None
        )
        for digest, size in missing.items():
            path, stamp = local[digest]
            target = replica.blob_path(digest)
            tmp = staged.pop(digest, None)
            if tmp is not None:
                replica.commit_staged(tmp, target)
                if advance is not None:
                    advance(size)
            else:
                replica.put_file(path, target, store.chunk_bytes, advance)
            if _stamp(path) != stamp:  # the hash pass saw other bytes: take it back
                replica.remove(target)
                raise ArtifactCorrupt(f"{path} changed while it was being published")
            outcome.blobs_written += 1
            outcome.bytes_written += size
            store.stats.add_written(replica.label, size)
        data = signed.to_bytes()
        replica.write_bytes(replica.digest_path(signed.digest), data)
        # The name is written last: a reader never finds a manifest whose blobs are missing.
        replica.write_bytes(replica.manifest_path(manifest.name, manifest.version), data)
    except Exception as exc:  # one replica failing is what the quorum is for: report it
        outcome.error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "publish of %s to %s failed: %s", manifest.ref, replica.label, outcome.error
        )
        return outcome
    outcome.ok = True
    return outcome
