"""One replica of the store: a root on an fsspec filesystem and the layout under it.

::

    <root>/blobs/sha256/<2 hex>/<64 hex>        the bytes, named by their sha256
    <root>/manifests/<name>/<version>.json      signed manifest envelopes by name
    <root>/digests/<2 hex>/<64 hex>.json        the same envelopes by manifest digest
    <root>/tmp/                                 staging for atomic writes (local dirs)

Writes never expose partial bytes: a local directory writes to ``tmp/`` and renames;
an object store (S3, GCS, ...) makes an object visible only when its upload
completes, and a failed upload is aborted rather than committed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem

from haif.artifacts._io import fsync_dir, start_writeback

# Object stores whose fsspec writers upload in parts and can abort an unfinished upload.
_ABORTABLE_UPLOADS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
_SMALL_READ = 256 * 1024  # manifests are small: never allocate for the worst case up front
_REMOTE_READ_BLOCKS = 4  # chunks per ranged GET


class Replica:
    """A store root on one filesystem; ``label`` is how messages and counters name it."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        base: Path | None = None,
        *,
        fsync: bool = True,
    ) -> None:
        options = dict(storage_options or {})
        self._fsync = fsync
        if "://" not in url:
            path = Path(url).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            self.fs: Any = LocalFileSystem()
            self.root = str(path.resolve())
        else:
            if not url.startswith(("file://", "local://")):
                # Another process may write between two of our reads: never trust a listing.
                options.setdefault("use_listings_cache", False)
            self.fs, root = fsspec.core.url_to_fs(url, **options)
            self.root = root.rstrip("/")
        self.url = url
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._abortable = bool(set(protocols) & _ABORTABLE_UPLOADS)
        self.label = url

    def __repr__(self) -> str:
        return f"Replica({self.url!r})"

    # --- layout -------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return f"{self.root}/blobs/sha256/{digest[:2]}/{digest}"

    def manifest_path(self, name: str, version: str) -> str:
        return f"{self.root}/manifests/{name}/{version}.json"

    def digest_path(self, manifest_digest: str) -> str:
        return f"{self.root}/digests/{manifest_digest[:2]}/{manifest_digest}.json"

    # --- reads --------------------------------------------------------------------

    def size(self, path: str) -> int | None:
        """The size of ``path``, or None when it is missing."""
        try:
            if self.local:
                return os.stat(path).st_size
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def open_read(self, path: str, chunk_bytes: int) -> BinaryIO:
        """Raises: FileNotFoundError: ``path`` is missing."""
        if self.local:
            return open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        # Fewer, larger ranged GETs: an object store pays per request.
        return self.fs.open(
            path, "rb", block_size=chunk_bytes * _REMOTE_READ_BLOCKS, cache_type="readahead"
        )

    def read_bytes(self, path: str, limit: int) -> bytes | None:
        """A small file's bytes (manifests), or None when missing; at most ``limit`` + 1 bytes."""
        parts: list[bytes] = []
        total = 0
        try:
            with self.open_read(path, _SMALL_READ) as fh:
                while total <= limit and (part := fh.read(_SMALL_READ)):
                    parts.append(part)
                    total += len(part)
        except FileNotFoundError:
            return None
        return b"".join(parts)

    def manifests(self) -> list[tuple[str, str]]:
        """Every ``(name, version)`` with a manifest here."""
        found = self.fs.glob(f"{self.root}/manifests/*/*.json")
        out = []
        for path in found:
            name, file = str(path).rsplit("/", 2)[-2:]
            out.append((name, file[: -len(".json")]))
        return sorted(out)

    # --- writes -------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, path: str) -> Iterator[BinaryIO]:
        """A file to write ``path`` through; visible only if the block exits cleanly."""
        if self.local:
            with self._local_writer(path) as fh:
                yield fh
            return
        if not self._abortable:
            with self._staged_writer(path) as staged:
                yield staged
            return
        fh = self.fs.open(path, "wb")
        try:
            yield fh
        except BaseException:
            fh.discard()  # abort the multipart upload: nothing becomes visible
            fh.closed = True  # and never let close() / __del__ commit what was buffered
            raise
        fh.close()

    @contextlib.contextmanager
    def _local_writer(self, path: str) -> Iterator[BinaryIO]:
        tmp_dir = Path(self.root) / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb", buffering=0) as fh:
                yield fh
                if self._fsync:
                    os.fsync(fh.fileno())
            final = Path(path)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            if self._fsync:
                fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _staged_writer(self, path: str) -> Iterator[BinaryIO]:
        # Filesystems without abortable uploads: write aside, then move into place.
        tmp = f"{self.root}/tmp/{uuid.uuid4().hex}.part"
        try:
            with self.fs.open(tmp, "wb") as fh:
                yield fh
            self.fs.mv(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(tmp)

    def put_file(
        self, local: Path, path: str, chunk_bytes: int, on_bytes: Callable[[int], None] | None
    ) -> None:
        """Copy a local file to ``path`` the fastest way the filesystem has (atomic as ``writer``).

        A local directory gets an in-kernel copy (``copy_file_range``); an object store a
        parallel multipart upload. Nothing here hashes the bytes: the publisher checks
        that the source did not change, and every reader verifies every blob.
        """
        if not self.local:
            self.fs.put_file(str(local), path, callback=_Progress(on_bytes))
            return
        with open(local, "rb", buffering=0) as src, self._local_writer(path) as dst:
            _kernel_copy(src, dst, chunk_bytes, on_bytes)

    def stage_file(self, local: Path, chunk_bytes: int) -> Path:
        """Copy a local file into this local replica's ``tmp/``, unseen until ``commit_staged``."""
        tmp_dir = Path(self.root) / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.staged"
        try:
            with open(local, "rb", buffering=0) as src, open(tmp, "wb", buffering=0) as dst:
                _kernel_copy(src, dst, chunk_bytes, None)
                if self._fsync:
                    os.fsync(dst.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit_staged(self, staged: Path, path: str) -> None:
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        if self._fsync:
            fsync_dir(final.parent)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.writer(path) as fh:
            fh.write(data)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)


class _Progress(Callback):
    """fsspec's transfer callback, forwarded to a byte counter."""

    def __init__(self, on_bytes: Callable[[int], None] | None) -> None:
        super().__init__()
        self._on_bytes = on_bytes

    def relative_update(self, inc: int = 1) -> None:
        super().relative_update(inc)
        if self._on_bytes is not None:
            self._on_bytes(inc)


def _kernel_copy(
    src: BinaryIO, dst: BinaryIO, chunk_bytes: int, on_bytes: Callable[[int], None] | None
) -> None:
    """Copy in the kernel, chunk by chunk (progress, early writeback); plain reads where the
    kernel cannot."""
    offset = 0
    try:
        while n := os.copy_file_range(src.fileno(), dst.fileno(), chunk_bytes):
            start_writeback(dst.fileno(), offset, n)
            offset += n
            if on_bytes is not None:
                on_bytes(n)
        return
    except OSError:  # EXDEV on old kernels, filesystems without it: fall back to read/write
        pass
    while data := src.read(chunk_bytes):
        dst.write(data)
        if on_bytes is not None:
            on_bytes(len(data))
