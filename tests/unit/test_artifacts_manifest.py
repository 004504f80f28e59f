"""Manifests and keys: canonical JSON, Ed25519 signatures, strict parsing, trust per model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from haif.artifacts import (
    ArtifactRef,
    FileEntry,
    Manifest,
    PublicKey,
    SignedManifest,
    SigningKey,
    TrustPolicy,
    load_public_key,
    load_signing_key,
)
from haif.artifacts.manifest import canonical_json, sign_manifest
from haif.exceptions import ConfigError, ManifestInvalid, UntrustedSigner

pytestmark = pytest.mark.unit

DIGEST = "ab" * 32


def manifest(key: SigningKey, **changes: object) -> Manifest:
    data = {
        "name": "m",
        "version": "1",
        "signer": key.key_id,
        "created_at": "2026-01-01T00:00:00Z",
        "runtime": {"runtime": "torch"},
        "files": (
            FileEntry("config.json", DIGEST, 10),
            FileEntry("w/model.safetensors", "cd" * 32, 99),
        ),
    }
    data.update(changes)
    return Manifest(**data)  # type: ignore[arg-type]


def test_canonical_json_is_stable_and_refuses_floats() -> None:
    assert (
        canonical_json({"b": 1, "a": ["é", None, True]}) == '{"a":["é",null,true],"b":1}'.encode()
    )
    with pytest.raises(TypeError):
        canonical_json({"x": 1.5})


def test_signed_manifest_round_trip_and_digest() -> None:
    key = SigningKey.generate()
    signed = sign_manifest(manifest(key), key)
    data = signed.to_bytes()
    assert data == canonical_json(json.loads(data))  # stored canonically
    back = SignedManifest.from_bytes(data, where="here")
    assert back.manifest == signed.manifest and back.digest == signed.digest
    assert back.verify(TrustPolicy(global_keys=(key.public_key,)), "here") == signed.manifest
    body = json.loads(data)["manifest"]
    assert body["files"][0] == {"path": "config.json", "digest": f"sha256:{DIGEST}", "size": 10}
    assert body["signer"] == key.key_id and body["schema"] == "haif.artifact.manifest/v1"


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b["files"][0].update(size=11),
        lambda b: b["files"][1].update(digest="sha256:" + "ee" * 32),
        lambda b: b["runtime"].update(runtime="vllm"),
        lambda b: b.update(created_at="2030-01-01T00:00:00Z"),
    ],
)
def test_any_edit_breaks_the_signature(edit) -> None:  # noqa: ANN001
    key = SigningKey.generate()
    doc = json.loads(sign_manifest(manifest(key), key).to_bytes())
    edit(doc["manifest"])
    edited = SignedManifest.from_bytes(json.dumps(doc, indent=2).encode(), where="replica-1")
    with pytest.raises(ManifestInvalid, match="replica-1: signature does not match the manifest"):
        edited.verify(TrustPolicy(global_keys=(key.public_key,)), "replica-1")


def test_untrusted_and_unknown_signers() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    signed = sign_manifest(manifest(key), key)
    with pytest.raises(
        UntrustedSigner, match=f"signed by key {key.key_id}, which is not trusted for 'm'"
    ):
        signed.verify(TrustPolicy(global_keys=(other.public_key,)), "r")
    with pytest.raises(UntrustedSigner):
        signed.verify(TrustPolicy(), "r")
    # A signature by another key under this key's id is a forgery, not a trust question.
    forged = SignedManifest(signed.manifest, key.key_id, other.sign(signed.manifest.canonical()))
    with pytest.raises(ManifestInvalid):
        forged.verify(TrustPolicy(global_keys=(key.public_key,)), "r")


def test_trust_per_model_replaces_the_global_list() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    policy = TrustPolicy(global_keys=(a.public_key,), per_name={"special": (b.public_key,)})
    assert set(policy.keys_for("m")) == {a.key_id}
    assert set(policy.keys_for("special")) == {b.key_id}


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "", "a/./b", "a/"]
)
def test_paths_that_escape_the_model_directory_are_refused(path: str) -> None:
    key = SigningKey.generate()
    doc = json.loads(sign_manifest(manifest(key), key).to_bytes())
    doc["manifest"]["files"][0]["path"] = path
    with pytest.raises(ManifestInvalid, match="unsafe file path"):
        SignedManifest.from_bytes(json.dumps(doc).encode(), where="r")


@pytest.mark.parametrize(
    "data",
    [b"not json", b"{}", b'{"manifest": {}, "signature": {}}', b"\xff\xfe", b"[]"],
)
def test_malformed_envelopes_are_refused(data: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="r: malformed manifest"):
        SignedManifest.from_bytes(data, where="r")


def test_extra_fields_are_refused() -> None:
    key = SigningKey.generate()
    doc = json.loads(sign_manifest(manifest(key), key).to_bytes())
    doc["manifest"]["extra"] = 1
    with pytest.raises(ManifestInvalid):
        SignedManifest.from_bytes(json.dumps(doc).encode(), where="r")


def test_a_file_and_a_directory_of_the_same_name_are_refused() -> None:
    key = SigningKey.generate()
    files = (FileEntry("a", DIGEST, 1), FileEntry("a/b", DIGEST, 1))
    with pytest.raises(ManifestInvalid, match="lies under the file"):
        SignedManifest.from_bytes(
            sign_manifest(manifest(key, files=files), key).to_bytes(), where="r"
        )


def test_check_ref() -> None:
    key = SigningKey.generate()
    signed = sign_manifest(manifest(key), key)
    signed.check_ref(ArtifactRef.parse("m:1"), "r")
    signed.check_ref(ArtifactRef.parse(f"sha256:{signed.digest}"), "r")
    with pytest.raises(ManifestInvalid, match="describes m:1, not m:2"):
        signed.check_ref(ArtifactRef.parse("m:2"), "r")
    with pytest.raises(ManifestInvalid, match="manifest digest is"):
        signed.check_ref(ArtifactRef.parse("sha256:" + "0" * 64), "r")


@pytest.mark.parametrize("text", ["m", "m:", ":1", "m:1:2", "sha256:abc", "a b:1", "../x:1"])
def test_bad_refs(text: str) -> None:
    with pytest.raises(ValueError):
        ArtifactRef.parse(text)


def test_key_files_round_trip(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert load_signing_key(tmp_path / "k").key_id == key.key_id
    public = (tmp_path / "k.pub").read_text().strip()
    assert public.startswith("ed25519:") and PublicKey.parse(public) == key.public_key
    assert load_public_key("k.pub", tmp_path) == key.public_key
    assert load_public_key(public) == key.public_key
    with pytest.raises(FileExistsError):
        key.save(tmp_path / "k")
    with pytest.raises(ConfigError, match="cannot read public key"):
        load_public_key("missing.pub", tmp_path)
    with pytest.raises(ConfigError, match="32 bytes"):
        load_public_key("ed25519:AAAA")
    (tmp_path / "bad").write_text("junk")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_signing_key(tmp_path / "bad")
