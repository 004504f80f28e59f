"""What publish, verify, repair and list report: per replica, per blob."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.artifacts.manifest import Manifest
    from haif.exceptions import ArtifactError

OK = "ok"
MISSING = "missing"


@dataclass
class ReplicaOutcome:
    replica: str
    ok: bool
    blobs_written: int = 0
    bytes_written: int = 0
    error: str | None = None


@dataclass
class PublishReport:
    ref: str
    manifest_digest: str
    files: int
    total_bytes: int
    signer: str
    outcomes: list[ReplicaOutcome]

    @property
    def ok_replicas(self) -> int:
        return sum(o.ok for o in self.outcomes)


@dataclass
class BlobCheck:
    path: str
    digest: str
    size: int
    status: dict[str, str] = field(default_factory=dict)  # replica label -> ok | missing | why not

    @property
    def good(self) -> list[str]:
        return [label for label, s in self.status.items() if s == OK]


@dataclass
class VerifyReport:
    ref: str
    manifest: Manifest | None
    manifest_digest: str | None
    manifest_status: dict[str, str]
    blobs: list[BlobCheck]
    error: ArtifactError | None = None  # why no trusted manifest was found

    @property
    def valid(self) -> bool:
        """A trusted manifest exists and every blob has at least one good copy."""
        return self.manifest is not None and all(b.good for b in self.blobs)

    @property
    def clean(self) -> bool:
        """Every replica holds the trusted manifest and a good copy of every blob."""
        return (
            self.valid
            and all(s == OK for s in self.manifest_status.values())
            and all(len(b.good) == len(b.status) for b in self.blobs)
        )

    def problems(self) -> list[str]:
        out = [f"manifest in {label}: {s}" for label, s in self.manifest_status.items() if s != OK]
        for b in self.blobs:
            out += [
                f"{b.path} (sha256:{b.digest[:12]}) in {label}: {s}"
                for label, s in b.status.items()
                if s != OK
            ]
        return out


@dataclass
class RepairReport:
    ref: str
    fixed: list[str]
    unrepairable: list[str]
    after: VerifyReport


@dataclass
class ListedArtifact:
    ref: str
    manifest_digest: str
    files: int
    total_bytes: int
    signer: str
    created_at: str
    replicas: list[str]
    base: str | None = None  # a LoRA adapter: its base model's name:version when published
    base_manifest: str | None = None  # and that model's manifest digest
