"""Streamed transfers: read, hash and write in chunks, never a whole file in memory.

A transfer double-buffers: while chunk *i* is hashed (here) and written (on a helper
thread), chunk *i+1* is read (on another). ``hashlib`` and file I/O release the GIL on
large buffers, so the three overlap. Every byte read from a replica goes through
``copy_hashed``, which is where ``TransferStats`` counts them.
"""

from __future__ import annotations

import hashlib
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


def _write_all(dst: BinaryIO, data: memoryview) -> None:
    while data:
        n = dst.write(data)
        if n is None:  # some fsspec writers buffer everything and return None
            return
        data = data[n:]


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
        chunk_bytes: the unit of reads, hashes and writes (two buffers are live at once).
        on_bytes: called with the size of each chunk once it is hashed and written.
        limit: raise TooManyBytes as soon as more than this many bytes arrive.

    Raises:
        TooManyBytes: ``src`` is longer than ``limit``.
    """
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
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="haif-io") as pool:
        while n:
            total += n
            if limit is not None and total > limit:
                raise TooManyBytes(f"more than {limit} bytes")
            view = memoryview(buffers[i])[:n]
            ahead = pool.submit(_fill, src, buffers[1 - i])
            written = pool.submit(_write_all, dst, view) if dst is not None else None
            digest.update(view)
            if written is not None:
                written.result()  # the buffer is reused two chunks later
            if on_bytes is not None:
                on_bytes(n)
            n = ahead.result()
            i = 1 - i
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
