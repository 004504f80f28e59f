"""First start of a development deployment: a trusted signing key, the bundled models published.

``make serve`` serves MiniLM and the tiny test LLM from the artifact store like any other
model. On first start this generates ``artifacts.dev_signing_key`` (when missing), trusts
its public key, builds what ``dev_publish`` asks to build and publishes it, signed by that
key. Later starts find the artifacts on every replica and publish nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from haif.artifacts.keys import SigningKey, TrustPolicy, load_signing_key
from haif.artifacts.manifest import ArtifactRef
from haif.artifacts.store import OK, ArtifactStore
from haif.config import resolve_source

if TYPE_CHECKING:
    from haif.config import DevArtifactConfig, HaifConfig

logger = logging.getLogger("haif.artifacts")


def ensure_signing_key(path: Path) -> SigningKey:
    """The key at ``path``, generated (with ``PATH.pub``) when missing."""
    if path.exists():
        return load_signing_key(path)
    key = SigningKey.generate()
    try:
        key.save(path)
    except FileExistsError:  # another process generated it first: use theirs
        return load_signing_key(path)
    logger.info("generated the development signing key %s (key id %s)", path, key.key_id)
    return key


def ensure_dev_artifacts(config: HaifConfig) -> HaifConfig:
    """Return ``config`` trusting the dev key, with every ``dev_publish`` artifact published."""
    artifacts = config.artifacts
    if artifacts.dev_signing_key is None:
        return config
    base = config.base_path()
    key_path = Path(artifacts.dev_signing_key).expanduser()
    key = ensure_signing_key(key_path if key_path.is_absolute() else base / key_path)
    public = key.public_key.text()
    if public not in artifacts.trusted_keys:
        artifacts = artifacts.model_copy(update={"trusted_keys": [*artifacts.trusted_keys, public]})
        config = config.model_copy(update={"artifacts": artifacts})
    if not artifacts.dev_publish:
        return config
    store = ArtifactStore.from_config(artifacts, base)
    trust = TrustPolicy.from_config(artifacts, base)
    for item in artifacts.dev_publish:
        _publish(store, trust, key, item, base)
    return config


def _publish(
    store: ArtifactStore, trust: TrustPolicy, key: SigningKey, item: DevArtifactConfig, base: Path
) -> None:
    ref = ArtifactRef.parse(item.artifact)
    _, statuses, _ = store.manifest_statuses(ref, trust)
    if all(s == OK for s in statuses.values()):
        return
    source = resolve_source(item.source, base)
    if item.build == "tiny-llama":
        from haif.devmodels.tiny_llama import build_tiny_llama

        build_tiny_llama(source)
    runtime = {"runtime": item.runtime} if item.runtime else {}
    report = store.publish(
        source, ref.name or "", ref.version or "", key, runtime=runtime, trust=trust
    )
    written = sum(o.bytes_written for o in report.outcomes)
    logger.info(
        "published %s (manifest sha256:%s) to %d/%d replicas, %d bytes written",
        report.ref,
        report.manifest_digest,
        report.ok_replicas,
        len(report.outcomes),
        written,
    )
