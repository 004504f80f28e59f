"""The node cache: one content-addressed directory per node, shared by every worker on it.

::

    <cache>/blobs/<2 hex>/<64 hex>      verified blobs, read-only
    <cache>/tmp/                        downloads in progress (counted against the cap)
    <cache>/locks/<2 hex>/<64 hex>      one flock per blob: concurrent pulls download it once
    <cache>/manifests/<digest>.json     manifests already fetched (re-verified on every load)
    <cache>/refs/<name>/<version>       name:version → manifest digest (versions are immutable)
    <cache>/views/<digest>/...          a model directory: relative symlinks into blobs/
    <cache>/index.sqlite                sizes, last use, fingerprints, reservations, pins

A blob enters the cache only after its sha256 matched while it streamed in (written to
``tmp/``, fsynced, then renamed: readers never see a partial blob). Its inode, size and
times are recorded then; a later hit re-hashes it only when they changed (or always with
``rehash_hits``). Space is reserved before a download under one SQLite write
transaction, evicting the least recently used unpinned blobs, so blobs plus downloads
in flight never exceed ``max_bytes``. Pins belong to a process (``<pid>:<token>``); the
pins and reservations of a process that died are dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from haif.artifacts._io import TooManyBytes, copy_hashed, fsync_dir, group_reasons, hash_file
from haif.exceptions import ArtifactCorrupt, ArtifactError, ArtifactNotFound, CacheFull

if TYPE_CHECKING:
    from haif.artifacts.manifest import Manifest, SignedManifest
    from haif.artifacts.store import BlobSource
    from haif.config import ArtifactsConfig

logger = logging.getLogger("haif.artifacts")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, "
    "last_used REAL NOT NULL, fingerprint TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS reservations (digest TEXT NOT NULL, owner TEXT NOT NULL, "
    "size INTEGER NOT NULL, PRIMARY KEY (digest, owner))",
    "CREATE TABLE IF NOT EXISTS pins (digest TEXT NOT NULL, owner TEXT NOT NULL, "
    "PRIMARY KEY (digest, owner))",
)
_LOCK_POLL_MAX_S = 0.1


@dataclass(frozen=True)
class BlobFetch:
    path: Path
    hit: bool
    source: str | None  # the replica it came from; None on a hit
    failures: tuple[str, ...]  # replicas tried before, and why they were skipped


@dataclass(frozen=True)
class CacheUsage:
    blob_bytes: int
    reserved_bytes: int
    blobs: int
    pinned_blobs: int


def new_owner() -> str:
    """A pin/reservation owner id of this process."""
    return f"{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _alive(owner: str) -> bool:
    try:
        pid = int(owner.split(":", 1)[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True  # not ours to judge, or alive under another user
    return True


def _fingerprint(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class NodeCache:
    """The content-addressed cache of this node (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        chunk_bytes: int = 8 * 1024 * 1024,
        fsync: bool = True,
        lock_timeout_s: float = 900.0,
        rehash_hits: bool = False,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self.lock_timeout_s = lock_timeout_s
        self.rehash_hits = rehash_hits
        for sub in ("blobs", "tmp", "locks", "manifests", "refs", "views"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._db = root / "index.sqlite"
        self._local = threading.local()
        conn = self._connect()
        self._use_wal(conn)
        for statement in _SCHEMA:
            conn.execute(statement)
        self._sweep()

    @classmethod
    def from_config(cls, config: ArtifactsConfig, base: Path | None = None) -> NodeCache:
        root = Path(config.cache_dir).expanduser()
        if not root.is_absolute() and base is not None:
            root = base / root
        return cls(
            root.resolve(),
            config.cache_max_bytes,
            chunk_bytes=config.chunk_bytes,
            fsync=config.fsync,
            lock_timeout_s=config.lock_timeout_s,
            rehash_hits=config.rehash_cache_hits,
        )

    # --- index --------------------------------------------------------------------

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Put the index in WAL mode (once per file). Switching the mode takes the database
        exclusively and SQLite's busy timeout does not cover it: processes that open a new
        cache at the same moment retry here instead of failing with "database is locked"."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (reopened after a fork)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self._db, timeout=self.lock_timeout_s, isolation_level=None)
            # WAL + NORMAL: no fsync per commit. A power cut may lose the last index rows,
            # never blobs: _sweep() and _hit() reconcile the index with the files.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the cross-process critical section of the index."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _drop_stale(self, conn: sqlite3.Connection) -> None:
        owners = {
            row[0]
            for row in conn.execute("SELECT owner FROM pins UNION SELECT owner FROM reservations")
        }
        for owner in owners:
            if not _alive(owner):
                conn.execute("DELETE FROM pins WHERE owner = ?", (owner,))
                conn.execute("DELETE FROM reservations WHERE owner = ?", (owner,))

    def _sweep(self) -> None:
        """Drop downloads of dead processes and blobs that never made it into the index."""
        for tmp in (self.root / "tmp").iterdir():
            if not _alive(tmp.name.split(".", 1)[-1]):
                tmp.unlink(missing_ok=True)
        known = {row[0] for row in self._connect().execute("SELECT digest FROM blobs")}
        for sub in (self.root / "blobs").iterdir():
            for blob in sub.iterdir():
                if blob.name in known:
                    continue
                with self._try_lock(blob.name) as locked:
                    # Unlocked and still unknown: left by a crash between rename and index.
                    if locked and not self._indexed(blob.name):
                        blob.unlink(missing_ok=True)

    def _indexed(self, digest: str) -> bool:
        return (
            self._connect().execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone()
            is not None
        )

    def usage(self) -> CacheUsage:
        conn = self._connect()
        blob_bytes, blobs = conn.execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs"
        ).fetchone()
        reserved = conn.execute("SELECT COALESCE(SUM(size), 0) FROM reservations").fetchone()[0]
        pinned = conn.execute("SELECT COUNT(DISTINCT digest) FROM pins").fetchone()[0]
        return CacheUsage(
            blob_bytes=blob_bytes, reserved_bytes=reserved, blobs=blobs, pinned_blobs=pinned
        )

    def disk_bytes(self) -> int:
        """Bytes of blobs and downloads on disk: what ``max_bytes`` bounds."""
        total = 0
        for sub in ("blobs", "tmp"):
            for path in (self.root / sub).rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    if path.is_file():
                        total += path.stat().st_size
        return total

    # --- pins ---------------------------------------------------------------------

    def pin(self, digests: Iterable[str], owner: str) -> None:
        """Keep these blobs from eviction until ``unpin(owner)`` or the owner's process ends."""
        with self._tx() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO pins VALUES (?, ?)", [(d, owner) for d in digests]
            )

    def unpin(self, owner: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM pins WHERE owner = ?", (owner,))

    # --- blobs --------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    @contextlib.contextmanager
    def _try_lock(self, digest: str) -> Iterator[bool]:
        fd = self._lock_fd(digest)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _lock_fd(self, digest: str) -> int:
        path = self.root / "locks" / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def _blob_lock(self, digest: str) -> Iterator[None]:
        """Exclusive across processes and threads (flock on a per-call descriptor)."""
        fd = self._lock_fd(digest)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            delay = 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ArtifactError(
                            f"waited {self.lock_timeout_s:g}s for another download of "
                            f"sha256:{digest[:12]}"
                        ) from None
                    time.sleep(delay)  # another process is downloading it: wait for the lock
                    delay = min(delay * 2, _LOCK_POLL_MAX_S)
            yield
        finally:
            os.close(fd)

    def verified_hits(self, blobs: dict[str, int]) -> set[str]:
        """The blobs already here whose files are unchanged since they were verified.

        The fast path of a warm load: one query, one stat per blob, one write. Call it
        only for pinned blobs (so none is evicted meanwhile); anything it does not
        return goes through ``ensure_blob``.
        """
        if self.rehash_hits or not blobs:
            return set()
        marks = ",".join("?" * len(blobs))
        rows = (
            self._connect()
            .execute(
                f"SELECT digest, size, fingerprint FROM blobs WHERE digest IN ({marks})",
                list(blobs),
            )
            .fetchall()
        )
        hits = set()
        for digest, size, fingerprint in rows:
            try:
                st = self.blob_path(digest).stat()
            except FileNotFoundError:
                continue
            if size == blobs[digest] == st.st_size and fingerprint == _fingerprint(st):
                hits.add(digest)
        if hits:
            now = time.time()
            with self._tx() as conn:
                conn.executemany(
                    "UPDATE blobs SET last_used = ? WHERE digest = ?", [(now, d) for d in hits]
                )
        return hits

    def has_blob(self, digest: str, size: int) -> bool:
        """A verified copy is here (re-hashed if it changed since it was verified)."""
        with self._blob_lock(digest):
            return self._hit(digest, size)

    def _hit(self, digest: str, size: int) -> bool:
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            with self._tx() as conn:
                conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            return False
        row = (
            self._connect()
            .execute("SELECT size, fingerprint FROM blobs WHERE digest = ?", (digest,))
            .fetchone()
        )
        fingerprint = _fingerprint(st)
        if not (row == (size, fingerprint) and st.st_size == size and not self.rehash_hits):
            got, n = hash_file(path, self.chunk_bytes)
            if (got, n) != (digest, size):
                logger.warning("cached blob sha256:%s changed on disk; dropping it", digest[:12])
                path.unlink(missing_ok=True)
                with self._tx() as conn:
                    conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                return False
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE SET "
                "last_used = excluded.last_used, fingerprint = excluded.fingerprint, "
                "size = excluded.size",
                (digest, size, time.time(), fingerprint),
            )
        return True

    def _reserve(self, digest: str, size: int, owner: str) -> None:
        if size > self.max_bytes:
            raise CacheFull(
                f"blob sha256:{digest[:12]} has {size} bytes, "
                f"more than the cache cap of {self.max_bytes}"
            )
        with self._tx() as conn:
            self._drop_stale(conn)
            (stored,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()
            (reserved,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM reservations").fetchone()
            excess = stored + reserved + size - self.max_bytes
            if excess > 0:
                victims = conn.execute(
                    "SELECT digest, size FROM blobs WHERE digest NOT IN (SELECT digest FROM pins) "
                    "ORDER BY last_used"
                ).fetchall()
                for victim, victim_size in victims:
                    if excess <= 0:
                        break
                    self.blob_path(victim).unlink(missing_ok=True)
                    conn.execute("DELETE FROM blobs WHERE digest = ?", (victim,))
                    excess -= victim_size
                    logger.info(
                        "evicted sha256:%s (%d bytes) from the node cache", victim[:12], victim_size
                    )
            if excess > 0:
                raise CacheFull(
                    f"cannot fit sha256:{digest[:12]} ({size} bytes) under the cache cap of "
                    f"{self.max_bytes} bytes: {stored} stored, {reserved} downloading, "
                    "the rest pinned by loaded models"
                )
            conn.execute(
                "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?)", (digest, owner, size)
            )

    def _unreserve(self, digest: str, owner: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM reservations WHERE digest = ? AND owner = ?", (digest, owner))

    def ensure_blob(
        self,
        digest: str,
        size: int,
        sources: Sequence[BlobSource],
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> BlobFetch:
        """A verified local copy of a blob: a hit, or streamed from the first good source.

        Concurrent callers (threads or processes) of one digest download it once: the
        others wait on its lock and then find it here. Pin the digest first, or it may be
        evicted before you use it.

        Raises:
            ArtifactNotFound: no source has it.
            ArtifactCorrupt: the sources that have it serve other bytes.
            CacheFull: it cannot fit under the cap.
        """
        with self._blob_lock(digest):
            if self._hit(digest, size):
                return BlobFetch(self.blob_path(digest), hit=True, source=None, failures=())
            owner = new_owner()
            self._reserve(digest, size, owner)
            try:
                return self._download(digest, size, sources, owner, on_bytes)
            finally:
                self._unreserve(digest, owner)

    def _download(
        self,
        digest: str,
        size: int,
        sources: Sequence[BlobSource],
        owner: str,
        on_bytes: Callable[[int], None] | None,
    ) -> BlobFetch:
        final = self.blob_path(digest)
        failures: list[str] = []
        corrupt = False
        for source in sources:
            tmp = self.root / "tmp" / f"{digest}.{owner}"
            done = 0

            def counted(n: int, source: BlobSource = source) -> None:
                nonlocal done
                done += n
                source.record(n)
                if on_bytes is not None:
                    on_bytes(n)

            try:
                with source.open() as fin, open(tmp, "wb", buffering=0) as fout:
                    got, n = copy_hashed(fin, fout, self.chunk_bytes, on_bytes=counted, limit=size)
                    if (got, n) == (digest, size) and self.fsync:
                        os.fsync(fout.fileno())
            except FileNotFoundError:
                failures.append(f"{source.label}: missing")
                tmp.unlink(missing_ok=True)
                continue
            except TooManyBytes:
                got, n = "", size + 1
            except (
                Exception
            ) as exc:  # unreachable or failing mid-stream: fall back to the next replica
                failures.append(f"{source.label}: unreachable: {type(exc).__name__}: {exc}")
                tmp.unlink(missing_ok=True)
                if on_bytes is not None and done:
                    on_bytes(-done)
                continue
            if (got, n) != (digest, size):
                corrupt = True
                what = f"{n} bytes, expected {size}" if n != size else f"sha256 {got[:12]}…"
                failures.append(f"{source.label}: corrupt ({what})")
                logger.warning(
                    "replica %s holds a corrupt copy of sha256:%s", source.label, digest[:12]
                )
                tmp.unlink(missing_ok=True)
                if on_bytes is not None and done:
                    on_bytes(-done)  # the progress bar goes back for the next try
                continue
            os.chmod(tmp, 0o444)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            if self.fsync:
                fsync_dir(final.parent)
            with self._tx() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)",
                    (digest, size, time.time(), _fingerprint(final.stat())),
                )
            return BlobFetch(final, hit=False, source=source.label, failures=tuple(failures))
        detail = group_reasons(failures) or "no replica"
        if corrupt:
            raise ArtifactCorrupt(f"no replica holds a good copy of sha256:{digest} ({detail})")
        raise ArtifactNotFound(f"no replica holds sha256:{digest} ({detail})")

    # --- manifests, refs, views ------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def put_manifest(self, signed: SignedManifest) -> None:
        self._write_atomic(self.root / "manifests" / f"{signed.digest}.json", signed.to_bytes())

    def manifest_bytes(self, manifest_digest: str) -> bytes | None:
        try:
            return (self.root / "manifests" / f"{manifest_digest}.json").read_bytes()
        except FileNotFoundError:
            return None

    def set_ref(self, name: str, version: str, manifest_digest: str) -> None:
        if self.get_ref(name, version) == manifest_digest:
            return
        self._write_atomic(self.root / "refs" / name / version, manifest_digest.encode("ascii"))

    def get_ref(self, name: str, version: str) -> str | None:
        try:
            return (self.root / "refs" / name / version).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None

    def view(self, manifest: Manifest, manifest_digest: str) -> Path:
        """The model directory of a manifest whose blobs are here (and pinned)."""
        final = self.root / "views" / manifest_digest
        if final.is_dir():
            if self._view_ok(final, manifest):
                return final
            broken = final.with_name(f".broken-{manifest_digest}.{uuid.uuid4().hex}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, broken)
            shutil.rmtree(broken, ignore_errors=True)
        tmp = final.with_name(f".{manifest_digest}.{uuid.uuid4().hex}")
        for entry in manifest.files:
            link = tmp / entry.path
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(self.blob_path(entry.digest), link.parent), link)
        try:
            os.rename(tmp, final)
        except OSError:  # another worker built the same view first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not self._view_ok(final, manifest):
                raise ArtifactError(f"cannot build the model directory {final}") from None
        return final

    def _view_ok(self, view: Path, manifest: Manifest) -> bool:
        for entry in manifest.files:
            link = view / entry.path
            try:
                target = os.readlink(link)
            except OSError:
                return False
            if os.path.normpath(link.parent / target) != str(self.blob_path(entry.digest)):
                return False
        return True
