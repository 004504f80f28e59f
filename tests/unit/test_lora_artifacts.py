"""LoRA adapters as signed artifacts: the manifest records the base, the loader refuses what
does not check out (untrusted signer, another base, a model, a missing one) before loading
anything, and the CLI publishes an adapter with --base and lists it under its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from haif.artifacts import (
    ArtifactLoader,
    ArtifactRef,
    ArtifactStore,
    Manifest,
    SignedManifest,
    TrustPolicy,
)
from haif.artifacts.manifest import AdapterOf, FileEntry
from haif.cli.main import app
from haif.config import load_config
from haif.exceptions import AdapterNotFound, AdapterRejected, ManifestInvalid
from tests.support.lora_cases import BASE, OTHER_BASE, ROGUE, WRONG_BASE, LoraStore, build_models

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> LoraStore:
    return LoraStore.build(tmp_path_factory.mktemp("lora-store"))


def _manifest(adapter: AdapterOf | None = None) -> Manifest:
    return Manifest(name="a", version="1", files=(FileEntry("x", "0" * 64, 1),), signer="k",
                    created_at="2026-01-01T00:00:00Z", adapter=adapter)


def test_an_adapter_manifest_names_its_base_and_a_model_manifest_is_as_before() -> None:
    plain = _manifest()
    assert "adapter" not in plain.body()  # models published before adapters keep their digests
    assert Manifest.from_body(plain.body()) == plain
    adapter = _manifest(AdapterOf(base="tiny-llama:1", base_manifest="ab" * 32))
    assert adapter.body()["adapter"] == {"base": "tiny-llama:1", "base_manifest": "sha256:" + "ab" * 32}
    assert Manifest.from_body(adapter.body()) == adapter
    assert adapter.digest != plain.digest and not adapter.same_content(plain)
    for bad in ({"base": "x"}, {"base": "x", "base_manifest": "sha256:zz"}, "x"):
        with pytest.raises(ValueError, match="adapter"):
            Manifest.from_body({**plain.body(), "adapter": bad})


def test_the_base_digest_is_signed(lora: LoraStore) -> None:
    store = lora.store()
    replica = store.replicas[0]
    path = replica.manifest_path("lora-a", "1")
    doc = json.loads(replica.fs.cat_file(path))
    doc["manifest"]["adapter"]["base_manifest"] = "sha256:" + lora.digests[OTHER_BASE]
    signed = SignedManifest.from_bytes(json.dumps(doc).encode(), "edited")
    with pytest.raises(ManifestInvalid, match="signature does not match"):
        signed.verify(TrustPolicy(global_keys=(lora.key.public_key,)), "edited")


def test_list_reports_each_adapter_with_its_base(lora: LoraStore) -> None:
    listed = {a.ref: a for a in lora.store().list()}
    assert listed["lora-a:1"].base == BASE
    assert listed["lora-a:1"].base_manifest == lora.digests[BASE]
    assert listed[f"{WRONG_BASE}:1"].base_manifest == lora.digests[OTHER_BASE]
    assert listed[BASE].base is None


def test_adapter_of_refuses_an_adapter_as_base_and_an_untrusted_base(lora: LoraStore) -> None:
    store = lora.store()
    trust = TrustPolicy(global_keys=(lora.key.public_key,))
    assert store.adapter_of(ArtifactRef.parse(BASE), trust).base_manifest == lora.digests[BASE]
    with pytest.raises(ManifestInvalid, match="is a LoRA adapter"):
        store.adapter_of(ArtifactRef.parse("lora-a:1"), trust)
    with pytest.raises(Exception, match="not signed by a trusted key"):
        store.adapter_of(ArtifactRef.parse(BASE), TrustPolicy(global_keys=(lora.rogue.public_key,)))


def _loader(lora: LoraStore, tmp_path: Path) -> ArtifactLoader:
    return ArtifactLoader(lora.config(cache_dir=str(tmp_path / "cache")), tmp_path, "tiny-llama", ray_metrics=False)


def test_the_loader_pulls_a_good_adapter_of_this_base(lora: LoraStore, tmp_path: Path) -> None:
    pulled = _loader(lora, tmp_path).acquire_adapter("lora-a:1", lora.digests[BASE])
    try:
        assert (pulled.path / "adapter_config.json").is_file()
        assert (pulled.path / "adapter_model.safetensors").read_bytes() == (
            lora.adapter_dirs["lora-a"] / "adapter_model.safetensors"
        ).read_bytes()
        assert pulled.manifest.adapter is not None and pulled.manifest.adapter.base == BASE
    finally:
        pulled.release()


@pytest.mark.parametrize(
    ("artifact", "error", "reason"),
    [
        (f"{ROGUE}:1", AdapterRejected, r"\[untrusted_signer\].*not trusted"),
        (f"{WRONG_BASE}:1", AdapterRejected, r"\[base_mismatch\].*trained on other-llama:1"),
        (BASE, AdapterRejected, r"\[not_an_adapter\].*is a model, not a LoRA adapter"),
        ("lora-nope:1", AdapterNotFound, r"lora-nope:1.*not found"),
        ("not a ref", AdapterRejected, r"not `name:version`"),
    ],
)
def test_the_loader_refuses_and_names_the_reason_before_fetching_a_blob(
    lora: LoraStore, tmp_path: Path, artifact: str, error: type, reason: str
) -> None:
    loader = _loader(lora, tmp_path)
    with pytest.raises(error, match=reason):
        loader.acquire_adapter(artifact, lora.digests[BASE])
    assert loader.events.recent[-1]["event"] == "adapter_refused"
    blobs = tmp_path / "cache" / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*")), "nothing fetched"


def test_an_adapter_needs_a_base_served_from_the_store(lora: LoraStore, tmp_path: Path) -> None:
    with pytest.raises(AdapterRejected, match=r"\[base_mismatch\].*not served from a signed artifact"):
        _loader(lora, tmp_path).acquire_adapter("lora-a:1", None)


# --- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    monkeypatch.chdir(tmp_path)
    config = {"artifacts": {"replicas": ["store/r1", "store/r2"], "cache_dir": "cache",
                            "trusted_keys": ["keys/release.key.pub"], "fsync": False}}
    (tmp_path / "haif.yaml").write_text(yaml.safe_dump(config))
    base, adapters = build_models(tmp_path_factory.getbasetemp() / "cli-models")
    (tmp_path / "base").symlink_to(base)
    (tmp_path / "adapter").symlink_to(adapters["lora-a"])
    assert haif("keys", "generate", "--out", "keys/release.key")[0] == 0
    return tmp_path


def haif(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--config", "haif.yaml"])
    return result.exit_code, result.output


def test_publish_an_adapter_with_its_base_and_list_it_under_the_base(cli: Path) -> None:
    key = ("--key", "keys/release.key")
    code, out = haif("models", "publish", "base", "--name", "tiny-llama", "--version", "1", *key)
    assert code == 0, out
    base_digest = out.split("manifest: sha256:")[1].split()[0]
    code, out = haif("models", "publish", "adapter", "--name", "sql", "--version", "1", *key,
                     "--base", "tiny-llama:1")
    assert code == 0, out
    assert f"adapter of: tiny-llama:1 (manifest sha256:{base_digest})" in out
    code, out = haif("models", "list")
    assert code == 0, out
    lines = [line for line in out.splitlines() if "tiny-llama:1" in line or "sql:1" in line]
    assert "tiny-llama:1" in lines[0] and "└ sql:1 (adapter)" in lines[1], out
    code, out = haif("models", "list", "--json")
    listed = {a["ref"]: a for a in json.loads(out)}
    assert listed["sql:1"]["base"] == "tiny-llama:1" and listed["sql:1"]["base_manifest"] == base_digest
    code, out = haif("models", "verify", "sql:1")
    assert code == 0, out
    config = load_config(cli / "haif.yaml", environ={}).artifacts
    store, trust = ArtifactStore.from_config(config, cli), TrustPolicy.from_config(config, cli)
    signed = store.read_manifest(ArtifactRef.parse("sql:1"), trust)
    assert signed.manifest.adapter == AdapterOf(base="tiny-llama:1", base_manifest=base_digest)


def test_publish_refuses_what_is_not_an_adapter_of_a_known_base(cli: Path) -> None:
    key = ("--key", "keys/release.key")
    code, out = haif("models", "publish", "adapter", "--name", "sql", "--version", "1", *key,
                     "--base", "tiny-llama:1")
    assert code == 1 and "tiny-llama:1 not found" in out, out
    assert haif("models", "publish", "base", "--name", "tiny-llama", "--version", "1", *key)[0] == 0
    code, out = haif("models", "publish", "base", "--name", "sql", "--version", "1", *key,
                     "--base", "tiny-llama:1")
    assert code == 2 and "not a PEFT LoRA directory" in out, out
    code, out = haif("models", "publish", "adapter", "--name", "sql", "--version", "1", *key,
                     "--base", "nonsense")
    assert code == 2, out
