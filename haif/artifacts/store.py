"""The replicated store: publish to every replica at a write quorum, read with fallback, repair.

Every replica holds the same layout (see ``replicas``). Publishing hashes the model
directory (streamed), signs the manifest, then writes the missing blobs and the
manifest to all replicas in parallel; it succeeds when ``write_quorum`` replicas hold
everything. A blob that a replica already has is not written again. Reads try the
replicas in order and fall back on a missing, unreadable or wrong copy; ``repair``
re-copies bad or missing blobs and manifests from a good replica.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from haif.artifacts._io import TooManyBytes, TransferStats, copy_hashed, group_reasons, hash_file
from haif.artifacts.manifest import (
    MAX_MANIFEST_BYTES,
    AdapterOf,
    ArtifactRef,
    FileEntry,
    Manifest,
    SignedManifest,
    sign_manifest,
)
from haif.artifacts.replicas import Replica
from haif.artifacts.reports import (
    MISSING,
    OK,
    BlobCheck,
    ListedArtifact,
    PublishReport,
    RepairReport,
    ReplicaOutcome,
    VerifyReport,
)
from haif.exceptions import (
    ArtifactConflict,
    ArtifactCorrupt,
    ArtifactError,
    ArtifactNotFound,
    ManifestInvalid,
    QuorumNotReached,
    UntrustedSigner,
)

if TYPE_CHECKING:
    from haif.artifacts.keys import SigningKey, TrustPolicy
    from haif.config import ArtifactsConfig

logger = logging.getLogger("haif.artifacts")


class Progress(Protocol):
    """Where long transfers report bytes (the CLI draws rich progress bars)."""

    def task(self, description: str, total: int) -> Callable[[int], None]: ...


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

    def _manifest_at(self, replica: Replica, ref: ArtifactRef) -> SignedManifest | None:
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
                signed = self._manifest_at(replica, ref)
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
                signed = self._manifest_at(replica, ref)
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

    def _copy_blob(
        self, src: Replica, dst: Replica, entry: FileEntry, on_bytes: Callable[[int], None] | None
    ) -> None:
        """Stream one blob between replicas, verified on the way: a bad copy is never committed."""
        with src.open_read(src.blob_path(entry.digest), self.chunk_bytes) as fin:
            with dst.writer(dst.blob_path(entry.digest)) as fout:
                digest, size = copy_hashed(
                    fin, fout, self.chunk_bytes, on_bytes=on_bytes, limit=entry.size
                )
                if (digest, size) != (entry.digest, entry.size):
                    raise ArtifactCorrupt(
                        f"{src.label} served a bad copy of sha256:{entry.digest[:12]}"
                    )
        self.stats.add_read(src.label, entry.size)
        self.stats.add_written(dst.label, entry.size)

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
        ref = ArtifactRef.parse(f"{name}:{version}")
        files = scan_dir(source)
        if not files:
            raise ArtifactNotFound(f"nothing to publish: {source} holds no file")
        staged: dict[str, dict[str, Path]] = {r.label: {} for r in self.replicas if r.local}
        try:
            entries, local = self._hash_and_stage(files, staged, progress, ref)
            manifest = Manifest(
                name=name,
                version=version,
                files=tuple(entries),
                signer=key.key_id,
                runtime=dict(runtime or {}),
                adapter=adapter,
            )
            signed = self._reuse_or_sign(ref, manifest, key, trust)
            with ThreadPoolExecutor(
                max_workers=len(self.replicas), thread_name_prefix="haif-publish"
            ) as pool:
                outcomes = list(
                    pool.map(
                        lambda r: self._publish_to(
                            r, signed, local, staged.get(r.label, {}), progress
                        ),
                        self.replicas,
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
        if report.ok_replicas < self.write_quorum:
            failed = "; ".join(f"{o.replica}: {o.error}" for o in outcomes if not o.ok)
            raise QuorumNotReached(
                f"artifact {ref}: written to {report.ok_replicas} of {len(outcomes)} replicas, "
                f"write quorum is {self.write_quorum} ({failed})"
            )
        return report

    def _hash_and_stage(
        self,
        files: list[tuple[str, Path]],
        staged: dict[str, dict[str, Path]],
        progress: Progress | None,
        ref: ArtifactRef,
    ) -> tuple[list[FileEntry], dict[str, tuple[Path, tuple[int, ...]]]]:
        """Hash every file; meanwhile copy it into each local replica's staging area.

        The copies run in the kernel on other cores, so a local publish costs about one
        pass instead of two. A staged copy of a blob the replica already has is dropped.
        """
        local_replicas = [r for r in self.replicas if r.label in staged]
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
                    r.label: pool.submit(r.stage_file, path, self.chunk_bytes)
                    for r in local_replicas
                }
                digest, size = hash_file(path, self.chunk_bytes, on_bytes=advance)
                for label, copy in copies.items():
                    try:
                        tmp = copy.result()
                    except (
                        OSError
                    ) as exc:  # that replica's own write reports it, without a staged copy
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
        self, ref: ArtifactRef, manifest: Manifest, key: SigningKey, trust: TrustPolicy | None
    ) -> SignedManifest:
        from haif.artifacts.keys import TrustPolicy

        # What counts as "already published": a manifest that verifies under the trust
        # policy or the publishing key. Anything else at that path is garbage to overwrite.
        policy = TrustPolicy(
            global_keys=(*(trust.keys_for(ref.name).values() if trust else ()), key.public_key)
        )
        for replica in self.replicas:
            try:
                existing = self._manifest_at(replica, ref)
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
        self,
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
                    replica.put_file(path, target, self.chunk_bytes, advance)
                if _stamp(path) != stamp:  # the hash pass saw other bytes: take it back
                    replica.remove(target)
                    raise ArtifactCorrupt(f"{path} changed while it was being published")
                outcome.blobs_written += 1
                outcome.bytes_written += size
                self.stats.add_written(replica.label, size)
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
                    signed = self._manifest_at(replica, ArtifactRef(name=name, version=version))
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
        before = self.verify(ref, trust, progress)
        if before.manifest is None:
            raise before.error or ArtifactNotFound(f"artifact {ref} not found")
        by_label = {r.label: r for r in self.replicas}
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
                if self._copy_from_any(
                    [by_label[g] for g in good], by_label[label], entry, advance
                ):
                    fixed.append(f"{check.path} → {label} (was {check.status[label]})")
                else:
                    unrepairable.append(f"{check.path} → {label}: every copy attempt failed")
        signed = self.read_manifest(ref, trust)
        data = signed.to_bytes()
        m = signed.manifest
        for replica in self.replicas:
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
        return RepairReport(str(ref), fixed, unrepairable, self.verify(ref, trust))

    def _copy_from_any(
        self,
        sources: list[Replica],
        dst: Replica,
        entry: FileEntry,
        on_bytes: Callable[[int], None] | None,
    ) -> bool:
        for src in sources:
            try:
                self._copy_blob(src, dst, entry, on_bytes)
                return True
            except Exception as exc:  # try the next good copy; the caller reports total failure
                logger.warning(
                    "copy of %s from %s to %s failed: %s", entry.path, src.label, dst.label, exc
                )
        return False


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
