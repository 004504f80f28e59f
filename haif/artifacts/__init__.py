"""The artifact store: signed, content-addressed model artifacts on replicated fsspec storage.

* ``ArtifactStore``: blobs under their sha256 and signed manifests on ≥ 1 replicas (local
  directories, ``s3://``, any fsspec URL); publish at a write quorum, read with fallback,
  verify and repair.
* ``NodeCache``: the per-node, content-addressed cache every worker on the node shares.
* ``pull`` / ``ArtifactLoader``: manifest → trust → verified blobs → a model directory.
* ``SigningKey`` / ``PublicKey`` / ``TrustPolicy``: Ed25519 keys and who may sign what.

Failures raise the ``ArtifactError`` family of ``haif.exceptions``.
"""

from haif.artifacts._io import TransferStats
from haif.artifacts.cache import NodeCache
from haif.artifacts.keys import (
    PublicKey,
    SigningKey,
    TrustPolicy,
    load_public_key,
    load_signing_key,
)
from haif.artifacts.loader import ArtifactLoader, PulledArtifact, pull
from haif.artifacts.manifest import ArtifactRef, FileEntry, Manifest, SignedManifest
from haif.artifacts.replicas import Replica
from haif.artifacts.reports import PublishReport, RepairReport, VerifyReport
from haif.artifacts.store import ArtifactStore

__all__ = [
    "ArtifactLoader",
    "ArtifactRef",
    "ArtifactStore",
    "FileEntry",
    "Manifest",
    "NodeCache",
    "PublicKey",
    "PublishReport",
    "PulledArtifact",
    "RepairReport",
    "Replica",
    "SignedManifest",
    "SigningKey",
    "TransferStats",
    "TrustPolicy",
    "VerifyReport",
    "load_public_key",
    "load_signing_key",
    "pull",
]
