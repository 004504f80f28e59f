"""The artifact store on local directories and fsspec's memory:// filesystem (no network).

The same cases run on S3 (a moto server) in tests/integration/test_artifacts_store.py.
"""

from __future__ import annotations

import os
import tracemalloc
import uuid
from pathlib import Path

import pytest

from haif.artifacts import ArtifactRef, Replica, pull
from haif.exceptions import QuorumNotReached
from tests.support import artifact_cases as cases

pytestmark = pytest.mark.unit


def _local(tmp_path: Path) -> cases.Env:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    return cases.Env(
        replicas=[str(tmp_path / f"replica-{i}") for i in (1, 2, 3)],
        broken_replica=str(blocker / "replica"),
        tmp=tmp_path,
    )


def _memory_mix(tmp_path: Path) -> cases.Env:
    root = uuid.uuid4().hex
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    return cases.Env(
        replicas=[
            f"memory://{root}/replica-1",
            str(tmp_path / "replica-2"),
            f"memory://{root}/replica-3",
        ],
        broken_replica=str(blocker / "replica"),
        tmp=tmp_path,
    )


BACKENDS = {"local": _local, "memory+local": _memory_mix}


@pytest.fixture(params=sorted(BACKENDS))
def env(request: pytest.FixtureRequest, tmp_path: Path) -> cases.Env:
    return BACKENDS[request.param](tmp_path)


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_case(case, env: cases.Env) -> None:  # noqa: ANN001
    case(env)


def test_concurrent_pulls_from_processes_transfer_once(tmp_path: Path) -> None:
    cases.case_concurrent_pulls_from_processes_transfer_once(_local(tmp_path))


def test_large_files_stream_in_bounded_memory(tmp_path: Path) -> None:
    # 48 MiB through publish (hash + 3 replicas), verify and pull with 1 MiB chunks:
    # Python never holds more than a few chunks at once.
    env = _local(tmp_path)
    big = tmp_path / "src" / "model.safetensors"
    big.parent.mkdir()
    with open(big, "wb") as fh:
        for _ in range(48):
            fh.write(os.urandom(1024 * 1024))
    store = env.store(chunk_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        store.publish(big.parent, "big", "1", env.key)
        assert store.verify(ArtifactRef.parse("big:1"), env.trust()).clean
        pulled = pull(store, env.cache(), ArtifactRef.parse("big:1"), env.trust())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (pulled.path / "model.safetensors").stat().st_size == 48 * 1024 * 1024
    assert peak < 12 * 1024 * 1024, f"peak Python allocation {peak / 2**20:.1f} MiB"


def _memory(tmp_path: Path) -> cases.Env:
    root = uuid.uuid4().hex
    return cases.Env(
        [f"memory://{root}/replica-{i}" for i in (1, 2, 3)], f"memory://{root}/x", tmp_path
    )


# Local directories stage a copy while hashing and commit it; other filesystems upload.
@pytest.mark.parametrize(("step", "make_env"), [("commit_staged", _local), ("put_file", _memory)])
def test_a_source_changed_while_publishing_is_taken_back(
    step: str,
    make_env,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    env = make_env(tmp_path)
    store = env.store()
    source = env.source({"w.bin": b"x" * 1000})
    real = getattr(Replica, step)

    def then_edit(self: Replica, *args: object) -> None:
        real(self, *args)
        (source / "w.bin").write_bytes(b"y" * 1000)  # someone edits the model while it uploads

    monkeypatch.setattr(Replica, step, then_edit)
    with pytest.raises(QuorumNotReached, match="changed while it was being published"):
        store.publish(source, "m", "1", env.key)
    assert all(cases.blob_count(r) == 0 for r in store.replicas)


def test_probe_reports_each_replica(tmp_path: Path) -> None:
    from haif.artifacts.store import ArtifactStore

    (tmp_path / "up").mkdir()
    store = ArtifactStore([Replica(str(tmp_path / "up")), Replica(str(tmp_path / "gone"))], write_quorum=1)
    assert store.probe() == {str(tmp_path / "up"): "ok", str(tmp_path / "gone"): "missing"}
