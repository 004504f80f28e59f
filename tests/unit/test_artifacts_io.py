"""Streamed transfers (``haif.artifacts._io``): every path gives the bytes and digest it read."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from haif.artifacts._io import (
    PIPELINE_CHUNK_BYTES,
    TooManyBytes,
    copy_hashed,
    hash_file,
    start_writeback,
)

pytestmark = pytest.mark.unit

SIZE = 3 * PIPELINE_CHUNK_BYTES + 12_345  # several pipeline chunks and a short last one


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


def test_a_local_copy_is_byte_exact_whatever_chunk_size_is_asked(
    blob: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = blob
    for chunk in (64 * 1024, PIPELINE_CHUNK_BYTES, 8 * PIPELINE_CHUNK_BYTES):
        out = tmp_path / f"copy-{chunk}"
        seen: list[int] = []
        with open(path, "rb", buffering=0) as src, open(out, "wb", buffering=0) as dst:
            digest, size = copy_hashed(src, dst, chunk, on_bytes=seen.append)
            os.fsync(dst.fileno())
        assert (digest, size) == (hashlib.sha256(data).hexdigest(), SIZE)
        assert out.read_bytes() == data
        assert sum(seen) == SIZE
        assert max(seen) <= PIPELINE_CHUNK_BYTES  # capped to stay in cache


def test_hashing_a_local_file_reports_progress_and_the_right_digest(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    seen: list[int] = []
    assert hash_file(path, 8 * PIPELINE_CHUNK_BYTES, on_bytes=seen.append) == (
        hashlib.sha256(data).hexdigest(),
        SIZE,
    )
    assert sum(seen) == SIZE


def test_a_local_file_longer_than_its_manifest_says_is_refused(blob: tuple[Path, bytes]) -> None:
    path, _ = blob
    with open(path, "rb", buffering=0) as src, pytest.raises(TooManyBytes):
        copy_hashed(src, None, PIPELINE_CHUNK_BYTES, limit=SIZE - 1)


def test_a_stream_longer_than_its_manifest_says_is_refused_before_it_is_all_written(
    blob: tuple[Path, bytes],
) -> None:
    _, data = blob
    sink = io.BytesIO()
    with pytest.raises(TooManyBytes):
        copy_hashed(io.BytesIO(data), sink, PIPELINE_CHUNK_BYTES, limit=PIPELINE_CHUNK_BYTES + 1)
    assert len(sink.getvalue()) < SIZE


def test_a_stream_into_a_buffered_writer_is_byte_exact(blob: tuple[Path, bytes]) -> None:
    _, data = blob
    sink = io.BytesIO()
    assert copy_hashed(io.BytesIO(data), sink, PIPELINE_CHUNK_BYTES) == (
        hashlib.sha256(data).hexdigest(),
        SIZE,
    )
    assert sink.getvalue() == data


def test_starting_writeback_never_fails_the_write(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb", buffering=0) as fh:
        fh.write(b"x" * 4096)
        start_writeback(fh.fileno(), 0, 4096)
        start_writeback(fh.fileno(), 0, 0)
    read, write = os.pipe()  # no page cache behind it: the kernel refuses, nothing raises
    try:
        start_writeback(write, 0, 10)
    finally:
        os.close(read)
        os.close(write)
