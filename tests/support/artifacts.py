"""A real S3 endpoint (moto server on loopback) and the artifact store of the session deployment.

The ``moto_s3`` fixture (tests/integration/conftest.py) starts ``moto.server.ThreadedMotoServer``
on a free loopback port for the whole session: s3fs talks HTTP to it like to any S3.
``build_artifact_setup`` (the ``artifact_setup`` fixture) builds the
store the deployment serves from (two local directories and an S3 bucket), publishes
the artifacts the deployment must refuse (a flipped byte in every replica, an edited
manifest, an untrusted signer) plus good ones, and returns the ``HAIF_ARTIFACTS__*``
overrides that point the deployment at it. The deployment's own bootstrap then adds
MiniLM to the same store, signed by the same development key. The tiny LLM is published
here (``tiny-llama:1``; the bootstrap finds it on every replica and publishes nothing), so
that the LoRA adapters of ``tests.support.lora_cases`` can name its manifest digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.deployment import CONFIG, ROOT

S3_KEY = "testing"
BAD_BLOB, BAD_MANIFEST, UNTRUSTED, SIGNED_ECHO = (
    "tampered-blob",
    "tampered-manifest",
    "untrusted",
    "signed-echo",
)


@dataclass(frozen=True)
class MotoS3:
    endpoint: str

    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint, "key": S3_KEY, "secret": S3_KEY}

    def create_bucket(self, prefix: str = "haif") -> str:
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options()).mkdir(name)
        return name


def flip_byte(replica, path: str, offset: int = 7) -> None:  # noqa: ANN001 - a haif Replica
    """Change one byte of a stored file, on a local directory or S3 alike."""
    data = bytearray(replica.fs.cat_file(path))
    data[offset % len(data)] ^= 0x01
    replica.fs.pipe_file(path, bytes(data))


def edit_manifest(replica, path: str) -> None:  # noqa: ANN001
    """Change a runtime hint of a stored manifest and keep the old signature."""
    doc = json.loads(replica.fs.cat_file(path))
    doc["manifest"]["runtime"]["edited"] = "yes"
    replica.fs.pipe_file(path, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def write_payload(directory: Path, size: int = 256 * 1024) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.bin").write_bytes(os.urandom(size))
    (directory / "config.json").write_text(json.dumps({"id": uuid.uuid4().hex}))
    return directory


@dataclass(frozen=True)
class ArtifactSetup:
    env: dict[str, str]
    root: Path
    dev_key_id: str
    signed_echo_blobs: int
    lora_digests: dict[str, str]  # artifact ref -> manifest digest (tests.support.lora_cases)


def build_artifact_setup(moto_s3: MotoS3, root: Path) -> ArtifactSetup:
    """The session's artifact store under ``root`` and S3: what the deployment serves and refuses."""
    from haif.artifacts import ArtifactStore, SigningKey
    from haif.artifacts.dev import ensure_signing_key
    from haif.config import load_config

    bucket = moto_s3.create_bucket("haif-it")
    replicas = [str(root / "replica-1"), str(root / "replica-2"), f"s3://{bucket}/store"]
    env = {
        "HAIF_ARTIFACTS__REPLICAS": json.dumps(replicas),
        "HAIF_ARTIFACTS__STORAGE_OPTIONS": json.dumps({"s3": moto_s3.storage_options()}),
        "HAIF_ARTIFACTS__CACHE_DIR": str(root / "cache"),
        "HAIF_ARTIFACTS__DEV_SIGNING_KEY": str(root / "keys" / "dev-signing.key"),
    }
    config = load_config(ROOT / CONFIG, environ=env).artifacts
    store = ArtifactStore.from_config(config, ROOT)
    key = ensure_signing_key(root / "keys" / "dev-signing.key")
    echo = {"runtime": "echo"}

    source = write_payload(root / "src" / BAD_BLOB)
    store.publish(source, BAD_BLOB, "1", key, runtime=echo)
    weights = hashlib.sha256((source / "weights.bin").read_bytes()).hexdigest()
    for replica in store.replicas:
        flip_byte(replica, replica.blob_path(weights))

    report = store.publish(
        write_payload(root / "src" / BAD_MANIFEST), BAD_MANIFEST, "1", key, runtime=echo
    )
    for replica in store.replicas:
        edit_manifest(replica, replica.manifest_path(BAD_MANIFEST, "1"))
        edit_manifest(replica, replica.digest_path(report.manifest_digest))

    rogue = SigningKey.generate()  # never trusted by the deployment
    store.publish(write_payload(root / "src" / UNTRUSTED), UNTRUSTED, "1", rogue, runtime=echo)

    for version in ("1", "2", "3"):
        store.publish(
            write_payload(root / "src" / f"{SIGNED_ECHO}-{version}"),
            SIGNED_ECHO,
            version,
            key,
            runtime=echo,
        )
    # A version of signed-echo signed by a key the deployment does not trust: a rollout of
    # it must never get traffic (tests/integration/test_rollouts.py).
    store.publish(write_payload(root / "src" / f"{SIGNED_ECHO}-9"), SIGNED_ECHO, "9", rogue, runtime=echo)
    from tests.support.lora_cases import build_models, publish_all

    base_dir, adapter_dirs = build_models(root / "lora")
    lora_digests = publish_all(store, key, rogue, root / "lora", base_dir, adapter_dirs)
    return ArtifactSetup(
        env=env, root=root, dev_key_id=key.key_id, signed_echo_blobs=2, lora_digests=lora_digests
    )
