"""Streamed transfers: read, hash and write in chunks, never a whole file in memory.

A transfer double-buffers: while chunk *i* is hashed (here) and written (on a helper
thread), chunk *i+1* is read (on another). ``hashlib`` and file I/O release the GIL on
large buffers, so the three overlap. Every byte read from a replica goes through
``copy_hashed``, which is where ``TransferStats`` counts them.

Buffers stay small enough for the CPU's caches (``PIPELINE_CHUNK_BYTES``): a chunk read
into memory is hashed and written while it is still in cache, not fetched back from RAM.
Hashing a local file alone is one loop of small reads (``hashlib.file_digest``'s way),
faster than any pipeline: the read is a copy from the page cache into a hot buffer.

A durable local write asks the kernel to start writing each chunk back to disk as soon
as it is written (``start_writeback``), so that the closing ``fsync`` finds little left
to do: the disk works while the next chunks are hashed, instead of after all of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

ByteCallback = Callable[[int], None]


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class TooManyBytes(Exception):
    """The source holds more bytes than its manifest says (a wrong or tampered blob)."""


class Progress(Protocol):
    """Where long transfers report bytes (the CLI draws rich progress bars)."""

    def task(self, description: str, total: int) -> Callable[[int], None]: ...


class TransferStats:
    """Thread-safe byte counters per replica: what a pull or publish really moved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[str, int] = defaultdict(int)
        self._written: dict[str, int] = defaultdict(int)

    def add_read(self, source: str, n: int) -> None:
        with self._lock:
            self._read[source] += n

    def add_written(self, dest: str, n: int) -> None:
        with self._lock:
            self._written[dest] += n

    @property
    def bytes_read(self) -> int:
        with self._lock:
            return sum(self._read.values())

    @property
    def bytes_written(self) -> int:
        with self._lock:
            return sum(self._written.values())

    def read_by_source(self) -> dict[str, int]:
        with self._lock:
            return dict(self._read)

    def written_by_dest(self) -> dict[str, int]:
        with self._lock:
            return dict(self._written)


PIPELINE_CHUNK_BYTES = 1024**2  # reads, hashes and writes of a pipelined transfer
LOCAL_HASH_CHUNK_BYTES = 256 * 1024  # reads of a local file that is only hashed
_PROGRESS_EVERY_BYTES = 8 * 1024**2  # how often a local hash reports progress

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk.

    It does not wait for them (``fsync`` still makes the file durable); it only moves
    the disk's work earlier. A no-op where the platform or filesystem lacks it.
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: nothing started


def local_fd(dst: object) -> int | None:
    """The descriptor of ``dst`` when it is an unbuffered local file, else None."""
    return dst.fileno() if isinstance(dst, io.FileIO) else None


def _fill(src: _Readable, buf: bytearray) -> int:
    """Read until ``buf`` is full or the source ends (network streams return short reads)."""
    view = memoryview(buf)
    filled = 0
    readinto = getattr(src, "readinto", None)
    while filled < len(buf):
        if readinto is not None:
            n = readinto(view[filled:])
        else:
            data = src.read(len(buf) - filled)
            n = len(data)
            view[filled : filled + n] = data
        if not n:
            break
        filled += n
    return filled


def _write_all(dst: BinaryIO, data: memoryview, fd: int | None = None, offset: int = 0) -> None:
    """Write all of ``data``; with ``fd`` (``dst``'s, local, at ``offset``) start its writeback."""
    length = len(data)
    while data:
        n = dst.write(data)
        if n is None:  # some fsspec writers buffer everything and return None
            return
        data = data[n:]
    if fd is not None:
        start_writeback(fd, offset, length)


def copy_hashed(
    src: _Readable,
    dst: BinaryIO | None,
    chunk_bytes: int,
    *,
    on_bytes: ByteCallback | None = None,
    limit: int | None = None,
) -> tuple[str, int]:
    """Stream ``src`` into ``dst`` (or nowhere) and return ``(sha256 hex, byte count)``.

    Args:
        src: a readable binary file object.
        dst: a writable binary file object, or None to only hash.
        chunk_bytes: the most one read, hash and write takes (two buffers are live at
            once); at most ``PIPELINE_CHUNK_BYTES``, to stay in cache.
        on_bytes: called with the size of each chunk once it is hashed and written.
        limit: raise TooManyBytes as soon as more than this many bytes arrive.

    Raises:
        TooManyBytes: ``src`` is longer than ``limit``.
    """
    if dst is None and isinstance(src, io.FileIO):
        return _hash_local(src, on_bytes, limit)
    chunk_bytes = min(chunk_bytes, PIPELINE_CHUNK_BYTES)
    digest = hashlib.sha256()
    buffers = (bytearray(chunk_bytes), bytearray(chunk_bytes))
    total = 0
    n = _fill(src, buffers[0])
    if n < chunk_bytes:  # one short chunk: no pipeline to set up
        view = memoryview(buffers[0])[:n]
        if limit is not None and n > limit:
            raise TooManyBytes(f"{n} bytes, expected {limit}")
        digest.update(view)
        if dst is not None:
            _write_all(dst, view)
        if on_bytes is not None and n:
            on_bytes(n)
        return digest.hexdigest(), n
    i = 0
    fd = local_fd(dst)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="haif-io") as pool:
        while n:
            offset = total
            total += n
            if limit is not None and total > limit:
                raise TooManyBytes(f"more than {limit} bytes")
            view = memoryview(buffers[i])[:n]
            ahead = pool.submit(_fill, src, buffers[1 - i])
            written = pool.submit(_write_all, dst, view, fd, offset) if dst is not None else None
            digest.update(view)
            if written is not None:
                written.result()  # the buffer is reused two chunks later
            if on_bytes is not None:
                on_bytes(n)
            n = ahead.result()
            i = 1 - i
    return digest.hexdigest(), total


def _hash_local(
    src: io.FileIO, on_bytes: ByteCallback | None, limit: int | None
) -> tuple[str, int]:
    """``copy_hashed`` of a local file into nowhere: small reads, one thread."""
    digest = hashlib.sha256()
    buf = bytearray(LOCAL_HASH_CHUNK_BYTES)
    view = memoryview(buf)
    total = unreported = 0
    while n := src.readinto(buf):
        total += n
        if limit is not None and total > limit:
            raise TooManyBytes(f"more than {limit} bytes")
        digest.update(view[:n])
        unreported += n
        if on_bytes is not None and unreported >= _PROGRESS_EVERY_BYTES:
            on_bytes(unreported)
            unreported = 0
    if on_bytes is not None and unreported:
        on_bytes(unreported)
    return digest.hexdigest(), total


def hash_file(
    path: str | Path, chunk_bytes: int, on_bytes: ByteCallback | None = None
) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a local file, streamed."""
    with open(path, "rb", buffering=0) as fh:
        return copy_hashed(fh, None, chunk_bytes, on_bytes=on_bytes)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def group_reasons(reasons: list[str]) -> str:
    """``"r1: missing; r2: missing"`` → ``"r1, r2: missing"`` (reasons are ``"<label>: <why>"``)."""
    grouped: dict[str, list[str]] = {}
    for reason in reasons:
        label, sep, why = reason.partition(": ")
        grouped.setdefault(why if sep else reason, []).append(label if sep else "")
    return "; ".join(
        f"{', '.join(filter(None, labels))}: {why}" if any(labels) else why
        for why, labels in grouped.items()
    )
