"""The `haif` console script against replicas on S3 (moto server) and a local directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.artifacts import MotoS3, flip_byte


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    haif = Path(sys.executable).parent / "haif"
    return subprocess.run(
        [str(haif), *args, "--config", str(tmp / "haif.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_publish_verify_pull_repair_on_s3(moto_s3: MotoS3, tmp_path: Path) -> None:
    bucket = moto_s3.create_bucket()
    replicas = [f"s3://{bucket}/one", str(tmp_path / "local"), f"s3://{bucket}/two"]
    config = {
        "artifacts": {
            "replicas": replicas,
            "storage_options": {"s3": moto_s3.storage_options()},
            "cache_dir": str(tmp_path / "cache"),
            "trusted_keys": [str(tmp_path / "release.key.pub")],
        }
    }
    (tmp_path / "haif.yaml").write_text(yaml.safe_dump(config))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024))
    (model / "config.json").write_text("{}")

    assert run(tmp_path, "keys", "generate", "--out", "release.key").returncode == 0
    published = run(
        tmp_path,
        "models",
        "publish",
        str(model),
        "--name",
        "demo",
        "--version",
        "7",
        "--key",
        "release.key",
    )
    assert published.returncode == 0, published.stderr
    assert "3/3 replicas" in published.stdout
    assert "publish" in published.stderr  # the progress bars
    listed = run(tmp_path, "models", "list")
    assert "demo:7" in listed.stdout and "3/3" in listed.stdout
    assert run(tmp_path, "models", "verify", "demo:7").returncode == 0

    from haif.artifacts import ArtifactStore
    from haif.config import load_config

    store = ArtifactStore.from_config(load_config(tmp_path / "haif.yaml", environ={}).artifacts)
    digest = next(
        line.split("sha256:", 1)[1]
        for line in published.stdout.splitlines()
        if line.startswith("manifest:")
    )
    weights = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    flip_byte(store.replicas[0], store.replicas[0].blob_path(weights))  # the S3 copy read first

    degraded = run(tmp_path, "models", "verify", "demo:7")
    assert degraded.returncode == 3, degraded.stdout + degraded.stderr
    assert f"in s3://{bucket}/one: corrupt" in degraded.stdout
    pulled = run(tmp_path, "models", "pull", f"sha256:{digest.strip()}")
    assert pulled.returncode == 0, pulled.stderr
    assert f"from {tmp_path / 'local'}" in pulled.stdout  # fell back past the corrupt S3 copy
    view = Path(pulled.stdout.strip().splitlines()[-1])
    assert (view / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    repaired = run(tmp_path, "models", "repair", "demo:7")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert run(tmp_path, "models", "verify", "demo:7").returncode == 0

    for replica in store.replicas:
        flip_byte(replica, replica.blob_path(weights))
    assert run(tmp_path, "models", "verify", "demo:7").returncode == 1
    refused = run(tmp_path, "models", "pull", "demo:7")  # the node cache has it, but ...
    assert refused.returncode == 0  # ... a warm node serves its verified copy without the replicas
    shutil.rmtree(tmp_path / "cache")  # a cold node
    refused = run(tmp_path, "models", "pull", "demo:7")
    assert (
        refused.returncode == 1
        and "model.safetensors: no replica holds a good copy" in refused.stderr
    )
