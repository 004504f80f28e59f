"""First start of a development deployment: a trusted signing key, the bundled models published.

``make serve`` serves MiniLM and the tiny test LLM from the artifact store like any other
model. On first start this generates ``artifacts.dev_signing_key`` (when missing), builds
what ``dev_publish`` asks to build and publishes it, signed by that key. Later starts find
the artifacts on every replica and publish nothing. That key is trusted wherever the config
is (``haif.artifacts.trust``): by the workers, and by ``haif models verify`` on the same config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from haif.artifacts.keys import SigningKey, load_signing_key
from haif.artifacts.manifest import ArtifactRef
from haif.artifacts.store import OK, ArtifactStore
from haif.artifacts.trust import dev_key_path, trusted_keys
from haif.config import resolve_source

if TYPE_CHECKING:
    from haif.artifacts.keys import TrustPolicy
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


def ensure_dev_artifacts(config: HaifConfig) -> None:
    """Generate the development signing key when missing and publish every ``dev_publish``
    artifact with it. Its public key is trusted by ``haif.artifacts.trust.trusted_keys``,
    which the CLI, this and every worker use: the config itself is not changed."""
    artifacts = config.artifacts
    base = config.base_path()
    key_path = dev_key_path(artifacts, base)
    if key_path is None:
        return
    key = ensure_signing_key(key_path)
    if not artifacts.dev_publish:
        return
    store = ArtifactStore.from_config(artifacts, base)
    trust = trusted_keys(artifacts, base)
    for item in artifacts.dev_publish:
        _publish(store, trust, key, item, base)


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
