"""The node cache: verified admission, tamper detection, pins of dead processes, locks, views."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from haif.artifacts import FileEntry, Manifest, NodeCache, TransferStats
from haif.artifacts.store import BlobSource
from haif.exceptions import ArtifactCorrupt, ArtifactError, CacheFull

pytestmark = pytest.mark.unit


def source(
    label: str, data: bytes | None, stats: TransferStats, fail_after: int | None = None
) -> BlobSource:
    class Flaky(io.BytesIO):
        def readinto(self, b):  # noqa: ANN001, ANN202
            if fail_after is not None and self.tell() >= fail_after:
                raise ConnectionResetError("connection reset by peer")
            return super().readinto(b)

    def opener() -> io.BytesIO:
        if data is None:
            raise FileNotFoundError(label)
        return Flaky(data)

    return BlobSource(label=label, opener=opener, stats=stats)


def cache(tmp_path: Path, max_bytes: int = 10 * 1024**2, **kw: object) -> NodeCache:
    return NodeCache(tmp_path / "cache", max_bytes, chunk_bytes=4096, fsync=True, **kw)  # type: ignore[arg-type]


DATA = os.urandom(50_000)
DIGEST = hashlib.sha256(DATA).hexdigest()


def test_fetch_then_hit(tmp_path: Path) -> None:
    c, stats = cache(tmp_path), TransferStats()
    first = c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, stats)])
    assert (first.hit, first.source) == (False, "r1")
    assert first.path.read_bytes() == DATA
    assert first.path.stat().st_mode & 0o222 == 0  # read-only: no one writes through a view
    again = c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, stats)])
    assert again.hit and stats.bytes_read == len(DATA)
    assert c.usage().blob_bytes == len(DATA)


def test_mid_stream_failure_falls_back_and_leaves_nothing(tmp_path: Path) -> None:
    c, stats = cache(tmp_path), TransferStats()
    bad = bytearray(DATA)
    bad[100] ^= 1
    got = c.ensure_blob(
        DIGEST,
        len(DATA),
        [
            source("gone", None, stats),
            source("flaky", DATA, stats, fail_after=8192),
            source("corrupt", bytes(bad), stats),
            source("long", DATA + b"x", stats),
            source("good", DATA, stats),
        ],
    )
    assert got.source == "good"
    assert got.failures[0] == "gone: missing"
    assert got.failures[1].startswith("flaky: unreachable: ConnectionResetError")
    assert got.failures[2].startswith("corrupt: corrupt (sha256")
    assert got.failures[3].startswith("long: corrupt (")
    assert list((c.root / "tmp").iterdir()) == []
    assert c.usage().reserved_bytes == 0


def test_all_sources_bad_raises_and_reserves_nothing(tmp_path: Path) -> None:
    c, stats = cache(tmp_path), TransferStats()
    with pytest.raises(ArtifactCorrupt, match=r"r1, r2: corrupt"):
        c.ensure_blob(
            DIGEST,
            len(DATA),
            [source("r1", DATA[:-1] + bytes([DATA[-1] ^ 1]), stats), source("r2", DATA[:-1] + bytes([DATA[-1] ^ 1]), stats)],
        )
    assert not c.blob_path(DIGEST).exists()
    assert c.usage().reserved_bytes == 0 and c.usage().blobs == 0


def test_a_cached_blob_changed_on_disk_is_detected_and_fetched_again(tmp_path: Path) -> None:
    c, stats = cache(tmp_path), TransferStats()
    path = c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, stats)]).path
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:  # same size, one byte off
        fh.seek(10)
        fh.write(bytes([DATA[10] ^ 1]))
    got = c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, stats)])
    assert (got.hit, got.source) == (False, "r1")
    assert got.path.read_bytes() == DATA
    assert stats.bytes_read == 2 * len(DATA)


def test_rehash_hits_checks_every_load(tmp_path: Path) -> None:
    c, stats = cache(tmp_path, rehash_hits=True), TransferStats()
    c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, stats)])
    assert c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, stats)]).hit
    assert c.has_blob(DIGEST, len(DATA))


def test_blob_larger_than_the_cap(tmp_path: Path) -> None:
    c = cache(tmp_path, max_bytes=1024**2)
    big = b"x" * (1024**2 + 1)
    with pytest.raises(CacheFull, match="more than the cache cap"):
        c.ensure_blob(
            hashlib.sha256(big).hexdigest(), len(big), [source("r1", big, TransferStats())]
        )


def test_pins_of_a_dead_process_do_not_block_eviction(tmp_path: Path) -> None:
    c = cache(tmp_path, max_bytes=1024**2)
    a = os.urandom(600 * 1024)
    da = hashlib.sha256(a).hexdigest()
    c.ensure_blob(da, len(a), [source("r1", a, TransferStats())])
    # Another process pins the blob and dies without unpinning.
    code = (
        "import sys; from pathlib import Path; from haif.artifacts import NodeCache; "
        f"NodeCache(Path(sys.argv[1]), {1024**2})"
        ".pin([sys.argv[2]], f'{__import__(\"os\").getpid()}:x')"
    )
    subprocess.run([sys.executable, "-c", code, str(c.root), da], check=True)
    assert c.usage().pinned_blobs == 1
    b = os.urandom(600 * 1024)
    c.ensure_blob(hashlib.sha256(b).hexdigest(), len(b), [source("r1", b, TransferStats())])
    assert not c.blob_path(da).exists()
    assert c.usage().pinned_blobs == 0


def test_a_live_pin_blocks_eviction(tmp_path: Path) -> None:
    c = cache(tmp_path, max_bytes=1024**2)
    a = os.urandom(600 * 1024)
    da = hashlib.sha256(a).hexdigest()
    c.pin([da], f"{os.getpid()}:me")
    c.ensure_blob(da, len(a), [source("r1", a, TransferStats())])
    b = os.urandom(600 * 1024)
    with pytest.raises(CacheFull):
        c.ensure_blob(hashlib.sha256(b).hexdigest(), len(b), [source("r1", b, TransferStats())])
    c.unpin(f"{os.getpid()}:me")
    c.ensure_blob(hashlib.sha256(b).hexdigest(), len(b), [source("r1", b, TransferStats())])
    assert c.disk_bytes() <= 1024**2


def test_waiting_for_another_download_has_a_deadline(tmp_path: Path) -> None:
    c = cache(tmp_path, lock_timeout_s=0.3)
    lock = c.root / "locks" / DIGEST[:2] / DIGEST
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another process" is downloading this blob
        with pytest.raises(ArtifactError, match="waited 0.3s for another download"):
            c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, TransferStats())])


def test_crash_leftovers_are_swept(tmp_path: Path) -> None:
    c = cache(tmp_path)
    orphan = c.blob_path("ee" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash between rename and index")
    dead_tmp = c.root / "tmp" / f"{'ff' * 32}.999999999:abc"
    dead_tmp.write_bytes(b"partial download of a dead process")
    live_tmp = c.root / "tmp" / f"{'ff' * 32}.{os.getpid()}:abc"
    live_tmp.write_bytes(b"a download in progress")
    cache(tmp_path)
    assert not orphan.exists() and not dead_tmp.exists() and live_tmp.exists()


def test_views_are_relative_symlinks_and_are_rebuilt_when_broken(tmp_path: Path) -> None:
    c = cache(tmp_path)
    c.ensure_blob(DIGEST, len(DATA), [source("r1", DATA, TransferStats())])
    m = Manifest(
        name="m",
        version="1",
        signer="k",
        files=(FileEntry("a/w.bin", DIGEST, len(DATA)), FileEntry("b.bin", DIGEST, len(DATA))),
    )
    view = c.view(m, m.digest)
    assert (view / "a" / "w.bin").read_bytes() == DATA
    assert not os.path.isabs(os.readlink(view / "b.bin"))
    assert c.view(m, m.digest) == view
    (view / "b.bin").unlink()
    (view / "b.bin").write_bytes(b"swapped in")
    rebuilt = c.view(m, m.digest)
    assert (rebuilt / "b.bin").is_symlink() and (rebuilt / "b.bin").read_bytes() == DATA
