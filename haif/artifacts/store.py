"""The replicated store: publish to every replica at a write quorum, read with fallback, repair.

Every replica holds the same layout (see ``replicas``). Publishing hashes the model
directory (streamed), signs the manifest, then writes the missing blobs and the
manifest to all replicas in parallel; it succeeds when ``write_quorum`` replicas hold
everything. A blob that a replica already has is not written again. Reads try the
replicas in order and fall back on a missing, unreadable or wrong copy; ``repair``
re-copies bad or missing blobs and manifests from a good replica.

This module holds the store and its read side (manifests, blobs, list, verify); the
steps of publishing are in ``publish`` and those of repairing in ``repair``, which
depend on the store only through its public surface.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from haif.artifacts._io import Progress, TooManyBytes, TransferStats, copy_hashed, group_reasons
from haif.artifacts.manifest import (
    MAX_MANIFEST_BYTES,
    AdapterOf,
    ArtifactRef,
    FileEntry,
    SignedManifest,
)
from haif.artifacts.publish import publish_dir
from haif.artifacts.repair import repair_artifact
from haif.artifacts.replicas import Replica
from haif.artifacts.reports import (
    MISSING,
    OK,
    BlobCheck,
    ListedArtifact,
    PublishReport,
    RepairReport,
    VerifyReport,
)
from haif.exceptions import (
    ArtifactError,
    ArtifactNotFound,
    ManifestInvalid,
    UntrustedSigner,
)

if TYPE_CHECKING:
    from haif.artifacts.keys import SigningKey, TrustPolicy
    from haif.config import ArtifactsConfig

logger = logging.getLogger("haif.artifacts")


@dataclass(frozen=True)
class BlobSource:
    """One replica's copy of a blob, opened lazily: a cache hit opens none."""

    label: str
    opener: Callable[[], BinaryIO]
    stats: TransferStats

    def open(self) -> BinaryIO:
        return self.opener()

    def record(self, n: int) -> None:
        self.stats.add_read(self.label, n)


class ArtifactStore:
    """The replicas of one store, read in order and written in parallel."""

    def __init__(
        self,
        replicas: list[Replica],
        *,
        write_quorum: int | None = None,
        chunk_bytes: int = 8 * 1024 * 1024,
        max_parallel: int = 4,
    ) -> None:
        if not replicas:
            raise ValueError("a store needs at least one replica")
        self.replicas = replicas
        self.write_quorum = write_quorum or len(replicas) // 2 + 1
        if self.write_quorum > len(replicas):
            raise ValueError("write_quorum exceeds the number of replicas")
        self.chunk_bytes = chunk_bytes
        self.max_parallel = max_parallel
        self.stats = TransferStats()

    @classmethod
    def from_config(cls, config: ArtifactsConfig, base: Path | None = None) -> ArtifactStore:
        replicas = [
            Replica(r.url, r.storage_options, base, fsync=config.fsync)
            for r in config.replica_configs()
        ]
        return cls(
            replicas,
            write_quorum=config.quorum(),
            chunk_bytes=config.chunk_bytes,
            max_parallel=config.max_parallel_transfers,
        )

    def probe(self) -> dict[str, str]:
        """Each replica's reachability: ``ok``, or what failed (for ``/readyz``)."""
        results: dict[str, str] = {}
        for replica in self.replicas:
            try:
                results[replica.label] = "ok" if replica.fs.exists(replica.root) else "missing"
            except Exception as exc:  # any filesystem error: reported, not raised
                results[replica.label] = f"{type(exc).__name__}: {exc}"[:200]
        return results

    # --- manifests ----------------------------------------------------------------

    def manifest_at(self, replica: Replica, ref: ArtifactRef) -> SignedManifest | None:
        """One replica's manifest of ``ref``, parsed and matched to it, not trust-checked.

        Returns None where the replica has none; raises ``ManifestInvalid`` on a bad one
        and whatever the replica's filesystem raises when it is unreachable.
        """
        path = (
            replica.digest_path(ref.digest)
            if ref.digest
            else replica.manifest_path(ref.name, ref.version)
        )
        data = replica.read_bytes(path, MAX_MANIFEST_BYTES)
        if data is None:
            return None
        signed = SignedManifest.from_bytes(data, where=replica.label)
        signed.check_ref(ref, where=replica.label)
        return signed

    def manifest_statuses(
        self, ref: ArtifactRef, trust: TrustPolicy
    ) -> tuple[SignedManifest | None, dict[str, str], list[ArtifactError]]:
        """Each replica's manifest checked; the first trusted one (or None) and why others fail."""
        trusted: SignedManifest | None = None
        statuses: dict[str, str] = {}
        errors: list[ArtifactError] = []
        for replica in self.replicas:
            try:
                signed = self.manifest_at(replica, ref)
                if signed is None:
                    statuses[replica.label] = MISSING
                    errors.append(ArtifactNotFound(f"{replica.label}: missing"))
                    continue
                signed.verify(trust, where=replica.label)
            except ArtifactError as exc:
                statuses[replica.label] = f"{exc.code}: {exc.message}"
                errors.append(exc)
                continue
            except Exception as exc:  # an unreachable replica is a reason to fall back, not to fail
                statuses[replica.label] = f"unreachable: {type(exc).__name__}: {exc}"
                errors.append(
                    ArtifactNotFound(f"{replica.label}: unreachable: {type(exc).__name__}: {exc}")
                )
                continue
            if trusted is not None and signed.digest != trusted.digest:
                statuses[replica.label] = f"differs: manifest sha256:{signed.digest[:12]}"
                continue
            statuses[replica.label] = OK
            trusted = trusted or signed
        return trusted, statuses, errors

    def read_manifest(self, ref: ArtifactRef, trust: TrustPolicy) -> SignedManifest:
        """The first manifest of ``ref``, in replica order, whose signature checks out.

        Raises:
            UntrustedSigner / ManifestInvalid / ArtifactNotFound: no replica has a trusted
                manifest (the most telling reason wins; the message lists every replica).
        """
        errors: list[ArtifactError] = []
        for replica in self.replicas:
            try:
                signed = self.manifest_at(replica, ref)
                if signed is None:
                    errors.append(ArtifactNotFound(f"{replica.label}: missing"))
                    continue
                signed.verify(trust, where=replica.label)
                return signed
            except ArtifactError as exc:
                errors.append(exc)
            except Exception as exc:  # unreachable: fall back to the next replica
                errors.append(
                    ArtifactNotFound(f"{replica.label}: unreachable: {type(exc).__name__}: {exc}")
                )
        raise manifest_failure(ref, errors)

    def adapter_of(self, base: ArtifactRef, trust: TrustPolicy) -> AdapterOf:
        """What an adapter's manifest records of ``base``: its ref and its manifest digest.

        Raises:
            UntrustedSigner / ManifestInvalid / ArtifactNotFound: ``base`` has no trusted
                manifest here; an adapter is published only for a model that is.
            ManifestInvalid: ``base`` is itself an adapter.
        """
        signed = self.read_manifest(base, trust)
        if signed.manifest.adapter is not None:
            raise ManifestInvalid(
                f"{base} is a LoRA adapter (of {signed.manifest.adapter.base}), not a base model"
            )
        return AdapterOf(base=signed.manifest.ref, base_manifest=signed.digest)

    # --- blobs ----------------------------------------------------------------------

    def blob_sources(self, digest: str) -> list[BlobSource]:
        """The replicas' copies of a blob, in read order."""
        return [
            BlobSource(
                label=r.label,
                opener=lambda r=r: r.open_read(r.blob_path(digest), self.chunk_bytes),
                stats=self.stats,
            )
            for r in self.replicas
        ]

    def check_blob(
        self, replica: Replica, entry: FileEntry, on_bytes: Callable[[int], None] | None = None
    ) -> str:
        """``ok``, ``missing``, or what is wrong with one replica's copy (streamed, hashed)."""
        try:
            with replica.open_read(replica.blob_path(entry.digest), self.chunk_bytes) as fh:

                def counted(n: int) -> None:
                    self.stats.add_read(replica.label, n)
                    if on_bytes is not None:
                        on_bytes(n)

                digest, size = copy_hashed(
                    fh, None, self.chunk_bytes, on_bytes=counted, limit=entry.size
                )
        except FileNotFoundError:
            return MISSING
        except TooManyBytes:
            return f"corrupt: more than {entry.size} bytes"
        except Exception as exc:  # unreachable or unreadable: reported, the caller decides
            return f"unreachable: {type(exc).__name__}: {exc}"
        if size != entry.size:
            return f"corrupt: {size} bytes, expected {entry.size}"
        if digest != entry.digest:
            return f"corrupt: sha256 {digest[:12]}…"
        return OK

    # --- publish --------------------------------------------------------------------

    def publish(
        self,
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
        """Publish the files of ``source`` as ``name:version``, signed by ``key``.

        Idempotent: publishing the same bytes again writes only what a replica lacks.
        ``adapter`` makes it a LoRA adapter of that base (see ``adapter_of``).

        Raises:
            ArtifactNotFound: ``source`` holds no file.
            ArtifactConflict: ``name:version`` already holds other content, signed by a
                trusted key or by ``key``.
            QuorumNotReached: fewer than ``write_quorum`` replicas hold the artifact.
        """
        return publish_dir(
            self,
            source,
            name,
            version,
            key,
            runtime=runtime,
            trust=trust,
            progress=progress,
            adapter=adapter,
        )

    # --- list, verify, repair ----------------------------------------------------

    def list(self) -> list[ListedArtifact]:
        """Every ``name:version`` on any replica (manifests parsed, not trust-checked)."""
        found: dict[tuple[str, str, str], ListedArtifact] = {}
        for replica in self.replicas:
            try:
                pairs = replica.manifests()
            except Exception as exc:  # an unreachable replica lists nothing; the others still do
                logger.warning("cannot list %s: %s", replica.label, exc)
                continue
            for name, version in pairs:
                try:
                    signed = self.manifest_at(replica, ArtifactRef(name=name, version=version))
                except ArtifactError as exc:
                    logger.warning("%s", exc.message)
                    continue
                if signed is None:
                    continue
                m = signed.manifest
                key = (name, version, signed.digest)
                if key not in found:
                    found[key] = ListedArtifact(
                        ref=m.ref,
                        manifest_digest=signed.digest,
                        files=len(m.files),
                        total_bytes=m.total_bytes,
                        signer=m.signer,
                        created_at=m.created_at,
                        replicas=[],
                        base=m.adapter.base if m.adapter else None,
                        base_manifest=m.adapter.base_manifest if m.adapter else None,
                    )
                found[key].replicas.append(replica.label)
        return sorted(found.values(), key=lambda a: (a.ref, a.created_at))

    def verify(
        self, ref: ArtifactRef, trust: TrustPolicy, progress: Progress | None = None
    ) -> VerifyReport:
        """Check the manifest and hash every blob on every replica."""
        signed, statuses, errors = self.manifest_statuses(ref, trust)
        if signed is None:
            return VerifyReport(
                str(ref), None, None, statuses, [], error=manifest_failure(ref, errors)
            )
        manifest = signed.manifest
        unique = {f.digest: f for f in manifest.files}
        checks = {d: BlobCheck(path=f.path, digest=d, size=f.size) for d, f in unique.items()}
        jobs = [(r, f) for r in self.replicas for f in unique.values()]
        advance = (
            progress.task(f"verify {ref}", manifest.total_bytes * len(self.replicas))
            if progress
            else None
        )
        with ThreadPoolExecutor(
            max_workers=self.max_parallel, thread_name_prefix="haif-verify"
        ) as pool:
            results = list(pool.map(lambda job: self.check_blob(job[0], job[1], advance), jobs))
        for (replica, entry), status in zip(jobs, results, strict=True):
            checks[entry.digest].status[replica.label] = status
        ordered = [checks[d] for d in unique]
        for check in ordered:  # keep replica order in every status map
            check.status = {r.label: check.status[r.label] for r in self.replicas}
        return VerifyReport(str(ref), manifest, signed.digest, statuses, ordered)

    def repair(
        self, ref: ArtifactRef, trust: TrustPolicy, progress: Progress | None = None
    ) -> RepairReport:
        """Re-copy bad or missing manifests and blobs from a good replica, then verify again.

        Raises:
            UntrustedSigner / ManifestInvalid / ArtifactNotFound: no replica has a trusted
                manifest, so there is nothing to repair from.
        """
        return repair_artifact(self, ref, trust, progress)

def manifest_failure(ref: ArtifactRef, errors: list[ArtifactError]) -> ArtifactError:
    """The most telling error among the replicas' (untrusted > invalid > missing), listing all."""
    detail = group_reasons([e.message for e in errors]) or "no replica"
    for cls, what in (
        (UntrustedSigner, "is not signed by a trusted key"),
        (ManifestInvalid, "has no valid manifest"),
    ):
        if any(isinstance(e, cls) for e in errors):
            return cls(f"artifact {ref} {what}: {detail}")
    return ArtifactNotFound(f"artifact {ref} not found: {detail}")
