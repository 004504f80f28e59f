"""Manifests: what a model version is made of, in canonical JSON, signed with Ed25519.

The manifest body::

    {"schema": "haif.artifact.manifest/v1", "name": "minilm", "version": "1",
     "runtime": {"runtime": "embeddings"},
     "files": [{"path": "config.json", "digest": "sha256:<hex>", "size": 612}, ...],
     "created_at": "2026-11-26T21:00:00Z", "signer": "<key id>"}

A LoRA adapter's manifest has one field more, ``"adapter": {"base": "<name:version>",
"base_manifest": "sha256:<hex>"}``: the base model it was trained on, by the digest of that
model's manifest (signed with the rest, so a worker can refuse an adapter for another base).
A model's manifest has no such field: manifests published before adapters existed keep
their bytes and their digests.

Canonical JSON is UTF-8, keys sorted, no whitespace, no floats: the same body always
has the same bytes. The signature covers those bytes; the manifest digest is their
sha256. What is stored is the envelope ``{"manifest": body, "signature": {...}}``, also
canonical. Parsing is strict: a field too many, a path that escapes the model
directory or a malformed digest make the manifest invalid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from haif.exceptions import ManifestInvalid, UntrustedSigner

if TYPE_CHECKING:
    from haif.artifacts.keys import SigningKey, TrustPolicy

SCHEMA = "haif.artifact.manifest/v1"
ALGORITHM = "ed25519"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BODY_KEYS = {"schema", "name", "version", "runtime", "files", "created_at", "signer"}
_ADAPTER_KEYS = {"base", "base_manifest"}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; floats are refused (no canonical form)."""
    _check_canonical(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _check_canonical(obj: Any) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError("canonical JSON keys are strings")
            _check_canonical(value)
    elif isinstance(obj, list):
        for value in obj:
            _check_canonical(value)
    elif isinstance(obj, float):
        raise TypeError("canonical JSON has no floats")
    elif obj is not None and not isinstance(obj, (str, int, bool)):
        raise TypeError(f"not JSON: {type(obj).__name__}")


@dataclass(frozen=True, order=True)
class ArtifactRef:
    """``name:version`` or ``sha256:<manifest digest>``."""

    name: str | None = None
    version: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        """Raises: ValueError: neither form."""
        if text.startswith("sha256:"):
            digest = text[len("sha256:") :]
            if not _HEX64.match(digest):
                raise ValueError(f"{text!r}: a manifest digest is sha256:<64 hex digits>")
            return cls(digest=digest)
        name, sep, version = text.partition(":")
        if not sep or not _NAME.match(name) or not _VERSION.match(version):
            raise ValueError(f"{text!r} is not `name:version` or `sha256:<digest>`")
        return cls(name=name, version=version)

    def __str__(self) -> str:
        return f"sha256:{self.digest}" if self.digest else f"{self.name}:{self.version}"


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX, relative, inside the model directory
    digest: str  # sha256 hex of the bytes
    size: int


@dataclass(frozen=True)
class AdapterOf:
    """What makes a manifest an adapter's: the base model it applies to."""

    base: str  # the base's ``name:version`` when published (for people; the digest decides)
    base_manifest: str  # sha256 hex of the base model's manifest

    def body(self) -> dict[str, str]:
        return {"base": self.base, "base_manifest": f"sha256:{self.base_manifest}"}

    @classmethod
    def from_body(cls, body: Any) -> AdapterOf:
        """Raises: ValueError: not an adapter field."""
        if not isinstance(body, dict) or set(body) != _ADAPTER_KEYS:
            raise ValueError(f"an adapter field has exactly {sorted(_ADAPTER_KEYS)}")
        base, digest = body["base"], body["base_manifest"]
        if not isinstance(base, str) or not base:
            raise ValueError("bad adapter base")
        if not isinstance(digest, str) or not (digest.startswith("sha256:") and _HEX64.match(digest[7:])):
            raise ValueError(f"bad adapter base_manifest {digest!r}")
        return cls(base=base, base_manifest=digest[7:])


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    files: tuple[FileEntry, ...]
    signer: str
    created_at: str = field(
        default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    runtime: dict[str, str] = field(default_factory=dict)
    adapter: AdapterOf | None = None  # set: a LoRA adapter of that base

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def blobs(self) -> dict[str, int]:
        """Each distinct blob digest and its size (files with equal bytes share one)."""
        return {f.digest: f.size for f in self.files}

    def same_content(self, other: Manifest) -> bool:
        return (self.name, self.version, self.files, self.runtime, self.adapter) == (
            other.name,
            other.version,
            other.files,
            other.runtime,
            other.adapter,
        )

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "runtime": dict(self.runtime),
            "files": [
                {"path": f.path, "digest": f"sha256:{f.digest}", "size": f.size} for f in self.files
            ],
            "created_at": self.created_at,
            "signer": self.signer,
        }
        if self.adapter is not None:
            body["adapter"] = self.adapter.body()
        return body

    def canonical(self) -> bytes:
        return canonical_json(self.body())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @classmethod
    def from_body(cls, body: Any) -> Manifest:
        """Raises: ValueError: the body breaks the schema."""
        if not isinstance(body, dict) or set(body) - {"adapter"} != _BODY_KEYS:
            raise ValueError(
                f"a manifest has exactly the fields {sorted(_BODY_KEYS)} (and `adapter` for an adapter)"
            )
        if body["schema"] != SCHEMA:
            raise ValueError(f"unknown manifest schema {body['schema']!r}")
        name, version = body["name"], body["version"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"bad name {name!r}")
        if not isinstance(version, str) or not _VERSION.match(version):
            raise ValueError(f"bad version {version!r}")
        runtime = body["runtime"]
        if not isinstance(runtime, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in runtime.items()
        ):
            raise ValueError("runtime hints are a string-to-string mapping")
        for key in ("created_at", "signer"):
            if not isinstance(body[key], str) or not body[key]:
                raise ValueError(f"bad {key}")
        if not isinstance(body["files"], list) or not body["files"]:
            raise ValueError("a manifest lists at least one file")
        files = tuple(_file_entry(item) for item in body["files"])
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("a path is listed twice")
        _check_no_prefix_clash(paths)
        return cls(
            name=name,
            version=version,
            files=files,
            signer=body["signer"],
            created_at=body["created_at"],
            runtime=dict(runtime),
            adapter=AdapterOf.from_body(body["adapter"]) if "adapter" in body else None,
        )


def _file_entry(item: Any) -> FileEntry:
    if not isinstance(item, dict) or set(item) != {"path", "digest", "size"}:
        raise ValueError("a file entry has exactly path, digest and size")
    path, digest, size = item["path"], item["digest"], item["size"]
    if not isinstance(path, str) or not is_safe_path(path):
        raise ValueError(f"unsafe file path {path!r}")
    if (
        not isinstance(digest, str)
        or not digest.startswith("sha256:")
        or not _HEX64.match(digest[7:])
    ):
        raise ValueError(f"bad digest {digest!r} of {path!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"bad size of {path!r}")
    return FileEntry(path=path, digest=digest[7:], size=size)


def is_safe_path(path: str) -> bool:
    """Relative, normalised, inside the model directory: no ``..``, no absolute, no backslash."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    parts = PurePosixPath(path).parts
    return all(p not in ("", ".", "..") for p in parts) and "/".join(parts) == path


def _check_no_prefix_clash(paths: list[str]) -> None:
    # "a" as a file and "a/b" as another would make the directory view ambiguous.
    files = set(paths)
    for path in paths:
        parts = PurePosixPath(path).parts
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise ValueError(f"{path!r} lies under the file {'/'.join(parts[:i])!r}")


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    key_id: str
    signature: bytes

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "manifest": self.manifest.body(),
                "signature": {
                    "algorithm": ALGORITHM,
                    "key_id": self.key_id,
                    "value": base64.b64encode(self.signature).decode("ascii"),
                },
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SignedManifest:
        """Parse an envelope.

        Raises:
            ManifestInvalid: not an envelope of a well-formed manifest (``where`` names it).
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestInvalid(f"{where}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            doc = json.loads(data.decode("utf-8"))
            if not isinstance(doc, dict) or set(doc) != {"manifest", "signature"}:
                raise ValueError("an envelope has exactly `manifest` and `signature`")
            sig = doc["signature"]
            if not isinstance(sig, dict) or set(sig) != {"algorithm", "key_id", "value"}:
                raise ValueError("a signature has exactly algorithm, key_id and value")
            if sig["algorithm"] != ALGORITHM:
                raise ValueError(f"unsupported signature algorithm {sig['algorithm']!r}")
            if not isinstance(sig["key_id"], str) or not isinstance(sig["value"], str):
                raise ValueError("bad signature fields")
            signature = base64.b64decode(sig["value"], validate=True)
            manifest = Manifest.from_body(doc["manifest"])
        except (
            UnicodeDecodeError,
            json.JSONDecodeError,
            binascii.Error,
            ValueError,
            TypeError,
        ) as exc:
            raise ManifestInvalid(f"{where}: malformed manifest: {exc}") from None
        return cls(manifest=manifest, key_id=sig["key_id"], signature=signature)

    def verify(self, trust: TrustPolicy, where: str) -> Manifest:
        """The manifest, once its signature checks out against a key trusted for its name.

        Raises:
            UntrustedSigner: the signing key is unknown, or not trusted for this artifact.
            ManifestInvalid: the signature does not match the bytes (an edited manifest).
        """
        m = self.manifest
        if self.key_id != m.signer:
            raise ManifestInvalid(
                f"{where}: signature key {self.key_id} is not the signer {m.signer}"
            )
        keys = trust.keys_for(m.name)
        key = keys.get(self.key_id)
        if key is None:
            raise UntrustedSigner(
                f"{where}: signed by key {self.key_id}, which is not trusted for {m.name!r} "
                f"({len(keys)} trusted key(s))"
            )
        if not key.verify(self.signature, m.canonical()):
            raise ManifestInvalid(
                f"{where}: signature does not match the manifest (edited or corrupt)"
            )
        return m

    def check_ref(self, ref: ArtifactRef, where: str) -> None:
        """Raises: ManifestInvalid: the manifest is not the one ``ref`` asks for."""
        m = self.manifest
        if ref.digest is not None and m.digest != ref.digest:
            raise ManifestInvalid(f"{where}: manifest digest is sha256:{m.digest}, not {ref}")
        if ref.name is not None and (m.name, m.version) != (ref.name, ref.version):
            raise ManifestInvalid(f"{where}: the manifest describes {m.ref}, not {ref}")


def sign_manifest(manifest: Manifest, key: SigningKey) -> SignedManifest:
    if manifest.signer != key.key_id:
        raise ValueError("the manifest's signer must be the signing key's id")
    return SignedManifest(
        manifest=manifest, key_id=key.key_id, signature=key.sign(manifest.canonical())
    )
