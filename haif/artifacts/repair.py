"""Repairing an artifact: re-copy bad or missing blobs and manifests from a good replica.

``ArtifactStore.repair`` is the entry point. It works from ``ArtifactStore.verify``'s
report, copies each bad blob from a replica that holds a good one (hashed on the way, so
a bad copy is never committed), rewrites every manifest that differs, then verifies
again. This module sees the store only as a ``RepairTarget`` (it imports nothing of
``store``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from haif.artifacts._io import copy_hashed
from haif.artifacts.manifest import MAX_MANIFEST_BYTES, FileEntry
from haif.artifacts.reports import OK, RepairReport
from haif.exceptions import ArtifactCorrupt, ArtifactNotFound

if TYPE_CHECKING:
    from haif.artifacts.keys import TrustPolicy
    from haif.artifacts.manifest import ArtifactRef
    from haif.artifacts.replicas import Replica
    from haif.artifacts._io import Progress, TransferStats
    from haif.artifacts.manifest import SignedManifest
    from haif.artifacts.reports import VerifyReport

logger = logging.getLogger("haif.artifacts")


class RepairTarget(Protocol):
    """What repairing needs of a store (``ArtifactStore`` is one)."""

    replicas: list[Replica]
    chunk_bytes: int
    stats: TransferStats

    def verify(self, ref: ArtifactRef, trust: TrustPolicy, progress: Progress | None = None) -> VerifyReport: ...

    def read_manifest(self, ref: ArtifactRef, trust: TrustPolicy) -> SignedManifest: ...


def repair_artifact(
    store: RepairTarget, ref: ArtifactRef, trust: TrustPolicy, progress: Progress | None = None
) -> RepairReport:
    """Repair ``ref`` on every replica of ``store`` (see ``ArtifactStore.repair``)."""
    before = store.verify(ref, trust, progress)
    if before.manifest is None:
        raise before.error or ArtifactNotFound(f"artifact {ref} not found")
    by_label = {r.label: r for r in store.replicas}
    fixed: list[str] = []
    unrepairable: list[str] = []
    for check in before.blobs:
        good = check.good
        bad = [label for label, s in check.status.items() if s != OK]
        if not bad:
            continue
        if not good:
            unrepairable.append(
                f"{check.path} (sha256:{check.digest[:12]}): no good copy in any replica"
            )
            continue
        entry = FileEntry(check.path, check.digest, check.size)
        advance = (
            progress.task(f"repair {check.path}", check.size * len(bad)) if progress else None
        )
        for label in bad:
            if _copy_from_any(store, [by_label[g] for g in good], by_label[label], entry, advance):
                fixed.append(f"{check.path} → {label} (was {check.status[label]})")
            else:
                unrepairable.append(f"{check.path} → {label}: every copy attempt failed")
    signed = store.read_manifest(ref, trust)
    data = signed.to_bytes()
    m = signed.manifest
    for replica in store.replicas:
        for path in (
            replica.manifest_path(m.name, m.version),
            replica.digest_path(signed.digest),
        ):
            try:
                if replica.read_bytes(path, MAX_MANIFEST_BYTES) != data:
                    replica.write_bytes(path, data)
                    fixed.append(f"manifest {path.rsplit('/', 1)[-1]} → {replica.label}")
            except Exception as exc:  # reported as unrepairable, the others still get fixed
                unrepairable.append(f"manifest → {replica.label}: {type(exc).__name__}: {exc}")
    return RepairReport(str(ref), fixed, unrepairable, store.verify(ref, trust))


def _copy_from_any(
    store: RepairTarget,
    sources: list[Replica],
    dst: Replica,
    entry: FileEntry,
    on_bytes: Callable[[int], None] | None,
) -> bool:
    for src in sources:
        try:
            _copy_blob(store, src, dst, entry, on_bytes)
            return True
        except Exception as exc:  # try the next good copy; the caller reports total failure
            logger.warning(
                "copy of %s from %s to %s failed: %s", entry.path, src.label, dst.label, exc
            )
    return False


def _copy_blob(
    store: RepairTarget,
    src: Replica,
    dst: Replica,
    entry: FileEntry,
    on_bytes: Callable[[int], None] | None,
) -> None:
    """Stream one blob between replicas, verified on the way: a bad copy is never committed."""
    with src.open_read(src.blob_path(entry.digest), store.chunk_bytes) as fin:
        with dst.writer(dst.blob_path(entry.digest)) as fout:
            digest, size = copy_hashed(
                fin, fout, store.chunk_bytes, on_bytes=on_bytes, limit=entry.size
            )
            if (digest, size) != (entry.digest, entry.size):
                raise ArtifactCorrupt(
                    f"{src.label} served a bad copy of sha256:{entry.digest[:12]}"
                )
    store.stats.add_read(src.label, entry.size)
    store.stats.add_written(dst.label, entry.size)
