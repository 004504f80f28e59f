"""Artifact-store behaviours every backend must have: run on local dirs and memory:// (unit) and on
local dirs, S3 (moto server) and a mix of both (integration).

Each ``case_*`` takes an ``Env``: three fresh replicas on one backend, a trusted key and a
scratch directory for node caches.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from haif.artifacts import (
    ArtifactRef,
    ArtifactStore,
    NodeCache,
    PublishReport,
    SigningKey,
    TrustPolicy,
    pull,
)
from haif.config import ArtifactsConfig
from haif.exceptions import (
    ArtifactConflict,
    ArtifactCorrupt,
    ArtifactNotFound,
    CacheFull,
    ManifestInvalid,
    QuorumNotReached,
    UntrustedSigner,
)
from tests.support.artifacts import flip_byte

CHUNK = 64 * 1024


@dataclass
class Env:
    replicas: list[str]
    broken_replica: str  # a URL on the same backend that cannot be written or read
    tmp: Path
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    key: SigningKey = field(default_factory=SigningKey.generate)

    def config(self, **changes: Any) -> ArtifactsConfig:
        data: dict[str, Any] = {
            "replicas": self.replicas,
            "storage_options": self.storage_options,
            "cache_dir": str(self.tmp / "cache"),
            "trusted_keys": [self.key.public_key.text()],
            "chunk_bytes": CHUNK,
            "fsync": False,
        }
        data.update(changes)
        return ArtifactsConfig.model_validate(data)

    def store(self, **changes: Any) -> ArtifactStore:
        return ArtifactStore.from_config(self.config(**changes), self.tmp)

    def trust(self, *keys: SigningKey) -> TrustPolicy:
        return TrustPolicy(global_keys=tuple(k.public_key for k in (keys or (self.key,))))

    def cache(self, name: str | None = None, max_bytes: int = 1024**3) -> NodeCache:
        return NodeCache(
            self.tmp / (name or f"cache-{uuid.uuid4().hex[:8]}"),
            max_bytes,
            chunk_bytes=CHUNK,
            fsync=False,
        )

    def source(self, files: dict[str, bytes]) -> Path:
        root = self.tmp / f"src-{uuid.uuid4().hex[:8]}"
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    def publish(
        self,
        name: str,
        version: str,
        files: dict[str, bytes],
        key: SigningKey | None = None,
        store: ArtifactStore | None = None,
    ) -> PublishReport:
        return (store or self.store()).publish(self.source(files), name, version, key or self.key)


def model_files(size: int = 300 * 1024) -> dict[str, bytes]:
    return {
        "weights.bin": os.urandom(size),
        "config.json": json.dumps({"id": uuid.uuid4().hex}).encode(),
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "tokenizer/copy.txt": b"a\nb\nc\n",  # same bytes: one blob
    }


def blob_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def edit_manifest(replica: Any, path: str) -> None:
    doc = json.loads(replica.fs.cat_file(path))
    doc["manifest"]["files"][0]["size"] += 1
    replica.fs.pipe_file(path, json.dumps(doc).encode())


def blob_count(replica: Any) -> int:
    return len(replica.fs.find(f"{replica.root}/blobs"))


# --- publish ----------------------------------------------------------------------------


def case_publish_list_pull_roundtrip(env: Env) -> None:
    files = model_files()
    store = env.store()
    report = env.publish("m", "1", files, store=store)
    assert report.ok_replicas == 3
    assert report.files == 4
    assert all(o.blobs_written == 3 for o in report.outcomes)  # 4 files, 3 distinct blobs
    (listed,) = store.list()
    assert (listed.ref, listed.manifest_digest, len(listed.replicas)) == (
        "m:1",
        report.manifest_digest,
        3,
    )
    assert listed.signer == env.key.key_id

    pulled = pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust())
    for rel, data in files.items():
        assert (pulled.path / rel).read_bytes() == data
    assert pulled.manifest_digest == report.manifest_digest
    assert pulled.blobs_fetched == 3 and pulled.blobs_hit == 0
    by_digest = pull(
        store, env.cache(), ArtifactRef.parse(f"sha256:{report.manifest_digest}"), env.trust()
    )
    assert (by_digest.path / "weights.bin").read_bytes() == files["weights.bin"]
    report_check = store.verify(ArtifactRef.parse("m:1"), env.trust())
    assert report_check.clean, report_check.problems()


def case_publish_is_idempotent_and_deduplicated(env: Env) -> None:
    files = model_files()
    store = env.store()
    first = env.publish("m", "1", files, store=store)
    blobs = [blob_count(r) for r in store.replicas]
    again = store.publish(env.source(files), "m", "1", env.key)
    assert again.manifest_digest == first.manifest_digest
    assert [o.bytes_written for o in again.outcomes] == [0, 0, 0]
    assert [blob_count(r) for r in store.replicas] == blobs
    # A new version sharing all but one file writes only the new blob.
    changed = {**files, "config.json": b'{"v": 2}'}
    second = store.publish(env.source(changed), "m", "2", env.key)
    assert [o.blobs_written for o in second.outcomes] == [1, 1, 1]
    assert [o.bytes_written for o in second.outcomes] == [len(b'{"v": 2}')] * 3
    assert [blob_count(r) for r in store.replicas] == [b + 1 for b in blobs]


def case_republishing_other_bytes_is_refused(env: Env) -> None:
    env.publish("m", "1", model_files())
    with pytest.raises(ArtifactConflict, match="m:1 is already published with other content"):
        env.publish("m", "1", model_files())


def case_write_quorum(env: Env) -> None:
    replicas = [*env.replicas[:2], env.broken_replica]
    report = env.store(replicas=replicas, write_quorum=2).publish(
        env.source(model_files()), "m", "1", env.key
    )
    assert report.ok_replicas == 2
    broken = report.outcomes[2]
    assert (broken.ok, broken.replica) == (False, env.broken_replica) and broken.error
    with pytest.raises(QuorumNotReached, match=r"written to 2 of 3 replicas, write quorum is 3"):
        env.store(replicas=replicas, write_quorum=3).publish(
            env.source(model_files()), "m", "2", env.key
        )


# --- reads: fallback, refusal, repair ---------------------------------------------------------


def case_flipped_byte_in_one_replica_falls_back_and_repair_fixes_it(env: Env) -> None:
    files = model_files()
    store = env.store()
    env.publish("m", "1", files, store=store)
    first = store.replicas[0]
    flip_byte(first, first.blob_path(blob_of(files["weights.bin"])))

    pulled = pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust())
    assert (pulled.path / "weights.bin").read_bytes() == files["weights.bin"]
    assert (
        pulled.sources.get(store.replicas[1].label) == 1
    )  # the weights came from the second replica

    ref = ArtifactRef.parse("m:1")
    report = store.verify(ref, env.trust())
    assert report.valid and not report.clean
    assert report.problems() == [
        f"weights.bin (sha256:{blob_of(files['weights.bin'])[:12]}) in {first.label}: "
        + report.blobs[[b.path for b in report.blobs].index("weights.bin")].status[first.label]
    ]
    repaired = store.repair(ref, env.trust())
    assert [f.split(" → ")[0] for f in repaired.fixed] == ["weights.bin"]
    assert repaired.after.clean and not repaired.unrepairable
    assert (
        bytes(first.fs.cat_file(first.blob_path(blob_of(files["weights.bin"]))))
        == files["weights.bin"]
    )


def case_flipped_byte_everywhere_is_refused(env: Env) -> None:
    files = model_files()
    store = env.store()
    report = env.publish("m", "1", files, store=store)
    for replica in store.replicas:
        flip_byte(replica, replica.blob_path(blob_of(files["weights.bin"])))
    cache = env.cache()
    with pytest.raises(ArtifactCorrupt) as info:
        pull(store, cache, ArtifactRef.parse("m:1"), env.trust())
    message = info.value.message
    assert message.startswith("artifact m:1: weights.bin: no replica holds a good copy")
    assert all(r.label in message for r in store.replicas)
    # Never a partial load: no model directory, no pins, no half-written blob.
    assert not (cache.root / "views" / report.manifest_digest).exists()
    assert cache.usage().pinned_blobs == 0
    assert not cache.blob_path(blob_of(files["weights.bin"])).exists()
    assert list((cache.root / "tmp").iterdir()) == []
    repaired = store.repair(ArtifactRef.parse("m:1"), env.trust())
    assert repaired.unrepairable and not repaired.after.valid


def case_edited_manifest_is_refused(env: Env) -> None:
    store = env.store()
    report = env.publish("m", "1", model_files(), store=store)
    for replica in store.replicas:
        edit_manifest(replica, replica.manifest_path("m", "1"))
    with pytest.raises(
        ManifestInvalid, match=r"artifact m:1 has no valid manifest: .*signature does not match"
    ):
        pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust())
    # By digest the edited copies are also refused: their body no longer hashes to the digest.
    for replica in store.replicas:
        edit_manifest(replica, replica.digest_path(report.manifest_digest))
    with pytest.raises(ManifestInvalid):
        pull(store, env.cache(), ArtifactRef.parse(f"sha256:{report.manifest_digest}"), env.trust())


def case_edited_manifest_in_one_replica_falls_back(env: Env) -> None:
    store = env.store()
    env.publish("m", "1", model_files(), store=store)
    edit_manifest(store.replicas[0], store.replicas[0].manifest_path("m", "1"))
    pulled = pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust())
    assert pulled.manifest.ref == "m:1"
    report = store.verify(ArtifactRef.parse("m:1"), env.trust())
    assert report.valid and not report.clean
    assert "manifest_invalid" in report.manifest_status[store.replicas[0].label]
    assert store.repair(ArtifactRef.parse("m:1"), env.trust()).after.clean


def case_untrusted_signer_is_refused(env: Env) -> None:
    store = env.store()
    rogue = SigningKey.generate()
    env.publish("m", "1", model_files(), key=rogue, store=store)
    with pytest.raises(
        UntrustedSigner, match=rf"artifact m:1 is not signed by a trusted key: .*{rogue.key_id}"
    ):
        pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust())
    assert not store.verify(ArtifactRef.parse("m:1"), env.trust()).valid
    # Per-model trust replaces the global list for that name.
    per_model = TrustPolicy(global_keys=(env.key.public_key,), per_name={"m": (rogue.public_key,)})
    assert (
        pull(store, env.cache(), ArtifactRef.parse("m:1"), per_model).manifest.signer
        == rogue.key_id
    )
    env.publish("n", "1", model_files(), store=store)
    strict = TrustPolicy(global_keys=(env.key.public_key,), per_name={"n": (rogue.public_key,)})
    with pytest.raises(UntrustedSigner):
        pull(store, env.cache(), ArtifactRef.parse("n:1"), strict)


def case_missing_blob(env: Env) -> None:
    files = model_files()
    store = env.store()
    env.publish("m", "1", files, store=store)
    digest = blob_of(files["config.json"])
    store.replicas[0].remove(store.replicas[0].blob_path(digest))
    assert (
        pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust()).path / "config.json"
    ).exists()
    assert store.repair(ArtifactRef.parse("m:1"), env.trust()).after.clean
    for replica in store.replicas:
        replica.remove(replica.blob_path(digest))
    with pytest.raises(
        ArtifactNotFound, match=r"artifact m:1: config.json: no replica holds sha256:"
    ):
        pull(store, env.cache(), ArtifactRef.parse("m:1"), env.trust())
    with pytest.raises(ArtifactNotFound, match=r"artifact nope:1 not found"):
        pull(store, env.cache(), ArtifactRef.parse("nope:1"), env.trust())


# --- the node cache -----------------------------------------------------------------------


def case_warm_cache_reads_nothing_remote(env: Env) -> None:
    files = model_files()
    store = env.store()
    env.publish("m", "1", files, store=store)
    cache = env.cache("warm")
    pull(store, cache, ArtifactRef.parse("m:1"), env.trust()).release()
    assert store.stats.bytes_read == sum(
        len(v) for k, v in files.items() if k != "tokenizer/copy.txt"
    )
    # Every replica gone: a warm node still serves the model, reading nothing remote.
    dead = env.store(replicas=[env.broken_replica] * 3, write_quorum=1)
    again = pull(dead, cache, ArtifactRef.parse("m:1"), env.trust())
    assert (again.blobs_hit, again.blobs_fetched, again.manifest_from_cache) == (3, 0, True)
    assert dead.stats.bytes_read == 0
    assert (again.path / "weights.bin").read_bytes() == files["weights.bin"]
    # ... but the signature is still checked on every pull.
    with pytest.raises(UntrustedSigner):
        pull(dead, cache, ArtifactRef.parse("m:1"), env.trust(SigningKey.generate()))


def case_concurrent_pulls_transfer_once(env: Env, pulls: int = 8) -> None:
    files = model_files(2 * 1024 * 1024)
    store = env.store()
    env.publish("m", "1", files, store=store)
    cache = env.cache("shared")
    barrier = threading.Barrier(pulls)
    results: list[Any] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait()
            results.append(pull(store, cache, ArtifactRef.parse("m:1"), env.trust()))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(pulls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    unique = sum(len(v) for k, v in files.items() if k != "tokenizer/copy.txt")
    assert store.stats.bytes_read == unique  # every byte crossed from a replica once
    assert sum(r.blobs_fetched for r in results) == 3
    assert sum(r.blobs_hit for r in results) == 3 * (pulls - 1)
    assert len({r.path for r in results}) == 1


def _pull_in_process(config_json: str, base: str, trusted: str, queue: Any) -> None:
    from haif.artifacts import ArtifactStore, NodeCache, PublicKey, TrustPolicy, pull

    config = ArtifactsConfig.model_validate_json(config_json)
    store = ArtifactStore.from_config(config, Path(base))
    cache = NodeCache.from_config(config, Path(base))
    pulled = pull(
        store, cache, ArtifactRef.parse("m:1"), TrustPolicy(global_keys=(PublicKey.parse(trusted),))
    )
    queue.put((store.stats.bytes_read, pulled.blobs_fetched, str(pulled.path)))


def case_concurrent_pulls_from_processes_transfer_once(env: Env, pulls: int = 8) -> None:
    files = model_files(4 * 1024 * 1024)
    config = env.config(cache_dir=str(env.tmp / "node-cache"))
    env.publish("m", "1", files, store=ArtifactStore.from_config(config, env.tmp))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_pull_in_process,
            args=(config.model_dump_json(), str(env.tmp), env.key.public_key.text(), queue),
        )
        for _ in range(pulls)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    unique = sum(len(v) for k, v in files.items() if k != "tokenizer/copy.txt")
    assert sum(r[0] for r in results) == unique
    assert sum(r[1] for r in results) == 3
    assert len({r[2] for r in results}) == 1


def case_cache_stays_under_its_cap(env: Env) -> None:
    store = env.store()
    size = 400 * 1024
    for version in "123":
        env.publish("m", version, {"weights.bin": os.urandom(size)}, store=store)
    cap = int(size * 2.5)
    cache = env.cache("capped", max_bytes=cap)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, cache.disk_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        held = pull(
            store, cache, ArtifactRef.parse("m:1"), env.trust()
        )  # stays pinned (a loaded model)
        pull(store, cache, ArtifactRef.parse("m:2"), env.trust()).release()
        pull(
            store, cache, ArtifactRef.parse("m:3"), env.trust()
        ).release()  # evicts m:2, not pinned m:1
    finally:
        stop.set()
        sampler.join()
    assert peak <= cap
    assert cache.disk_bytes() <= cap
    assert (held.path / "weights.bin").stat().st_size == size  # pinned: still there
    pull(store, cache, ArtifactRef.parse("m:3"), env.trust()).release()
    assert cache.usage().blobs == 2  # m:1 and m:3
    assert (
        pull(store, cache, ArtifactRef.parse("m:2"), env.trust()).blobs_fetched == 1
    )  # evicted, fetched again
    # m:1 and m:2 are pinned (loaded) and m:3 was evicted for m:2: nothing can make room.
    env.publish("m", "4", {"weights.bin": os.urandom(size)}, store=store)
    with pytest.raises(CacheFull, match="pinned"):
        pull(store, cache, ArtifactRef.parse("m:4"), env.trust())
    assert cache.disk_bytes() <= cap


CASES: list[Callable[[Env], None]] = [
    case_publish_list_pull_roundtrip,
    case_publish_is_idempotent_and_deduplicated,
    case_republishing_other_bytes_is_refused,
    case_write_quorum,
    case_flipped_byte_in_one_replica_falls_back_and_repair_fixes_it,
    case_flipped_byte_everywhere_is_refused,
    case_edited_manifest_is_refused,
    case_edited_manifest_in_one_replica_falls_back,
    case_untrusted_signer_is_refused,
    case_missing_blob,
    case_warm_cache_reads_nothing_remote,
    case_concurrent_pulls_transfer_once,
    case_cache_stays_under_its_cap,
]
