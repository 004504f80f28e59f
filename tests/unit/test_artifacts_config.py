"""The artifact store's config, the first-start bootstrap, a worker's refusal, its LRU of models."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.loaded import LoadedModel, LoadedModels
from haif.artifacts import (
    ArtifactLoader,
    ArtifactRef,
    ArtifactStore,
    SigningKey,
    load_signing_key,
)
from haif.artifacts.dev import ensure_dev_artifacts
from haif.artifacts.trust import trusted_keys
from haif.config import ArtifactsConfig, HaifConfig, ModelConfig, load_config
from haif.exceptions import ArtifactRejected, ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]


def config_error(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "haif.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return str(info.value)


def test_a_model_names_an_artifact_or_a_path(tmp_path: Path) -> None:
    assert ModelConfig(name="m", runtime="torch", artifact="m:1").artifact == "m:1"
    assert ModelConfig(name="m", runtime="torch", artifact="sha256:" + "a" * 64).path is None
    assert (
        ModelConfig(name="e", runtime="echo", artifact="e:1").artifact == "e:1"
    )  # verified, unused
    both = {"models": [{"name": "m", "runtime": "torch", "artifact": "m:1", "path": "/x"}]}
    assert "give `artifact` or `path`, not both" in config_error(tmp_path, both)
    assert "artifact" in config_error(
        tmp_path, {"models": [{"name": "m", "runtime": "torch", "artifact": "m"}]}
    )
    build = {
        "models": [{"name": "m", "runtime": "torch", "artifact": "m:1", "build": "tiny-llama"}]
    }
    assert "`build` needs `path`" in config_error(tmp_path, build)


def test_artifacts_section(tmp_path: Path) -> None:
    config = ArtifactsConfig.model_validate(
        {
            "replicas": ["/a", {"url": "s3://b/p", "storage_options": {"key": "k"}}, "s3://c/p"],
            "storage_options": {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": "global"}},
        }
    )
    assert config.quorum() == 2  # a majority by default
    a, b, c = config.replica_configs()
    assert a.storage_options == {}
    assert b.storage_options == {"endpoint_url": "http://127.0.0.1:9", "key": "k"}
    assert c.storage_options == {"endpoint_url": "http://127.0.0.1:9", "key": "global"}
    assert "dev_publish needs" in config_error(
        tmp_path, {"artifacts": {"dev_publish": [{"artifact": "m:1", "source": "/x"}]}}
    )
    assert "cache_max_bytes" in config_error(tmp_path, {"artifacts": {"cache_max_bytes": 10}})
    assert "replicas" in config_error(tmp_path, {"artifacts": {"replicas": []}})


def test_shipped_configs_serve_from_the_store() -> None:
    local = load_config(ROOT / "configs" / "local.yaml", environ={})
    assert {m.name: m.artifact for m in local.models} == {
        "minilm": "minilm:1",
        "tiny-llama": "tiny-llama:1",
    }
    assert len(local.artifacts.replicas) == 3 and local.artifacts.dev_signing_key
    assert [d.artifact for d in local.artifacts.dev_publish] == ["minilm:1", "tiny-llama:1"]
    integration = load_config(ROOT / "tests" / "configs" / "integration.yaml", environ={})
    assert integration.model("tiny-llama").artifact == "tiny-llama:1"


def _dev_config(tmp_path: Path, source: Path) -> HaifConfig:
    return HaifConfig.model_validate(
        {
            "base_dir": str(tmp_path),
            "artifacts": {
                "replicas": ["store/r1", "store/r2", "store/r3"],
                "cache_dir": "cache",
                "dev_signing_key": "keys/dev.key",
                "dev_publish": [
                    {"artifact": "bundled:1", "source": str(source), "runtime": "echo"}
                ],
            },
        }
    )


def test_first_start_generates_trusts_and_publishes_once(tmp_path: Path) -> None:
    source = tmp_path / "bundled"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w" * 1000)
    config = _dev_config(tmp_path, source)
    ensure_dev_artifacts(config)
    key = load_signing_key(tmp_path / "keys" / "dev.key")
    trust = trusted_keys(config.artifacts, tmp_path)  # what the CLI and the workers trust
    assert list(trust.keys_for("bundled")) == [key.key_id]
    store = ArtifactStore.from_config(config.artifacts, tmp_path)
    assert store.verify(ArtifactRef.parse("bundled:1"), trust).clean
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*") if p.is_file())
    ensure_dev_artifacts(_dev_config(tmp_path, source))  # a restart: same key, nothing written
    assert load_signing_key(tmp_path / "keys" / "dev.key").key_id == key.key_id
    assert (
        sorted(p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*") if p.is_file())
        == before
    )


def test_a_worker_refuses_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key, rogue = SigningKey.generate(), SigningKey.generate()
    artifacts = ArtifactsConfig.model_validate(
        {
            "replicas": [str(tmp_path / "r1")],
            "cache_dir": str(tmp_path / "cache"),
            "trusted_keys": [key.public_key.text()],
        }
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 100)
    ArtifactStore.from_config(artifacts).publish(src, "m", "1", rogue)
    loader = ArtifactLoader(artifacts, tmp_path, "my-model", ray_metrics=False)
    with (
        caplog.at_level(logging.ERROR, logger="haif.artifacts"),
        pytest.raises(ArtifactRejected) as info,
    ):
        loader.acquire("m:1")
    assert info.value.message.startswith(
        "refused artifact m:1 [untrusted_signer]: artifact m:1 is not signed"
    )
    event = json.loads(caplog.records[-1].getMessage())
    assert (event["event"], event["model"], event["artifact"], event["reason"]) == (
        "artifact_refused",
        "my-model",
        "m:1",
        "untrusted_signer",
    )
    assert list(loader.events.recent) == [event]
    with pytest.raises(ArtifactRejected, match=r"\[artifact_error\]"):
        loader.acquire("not a ref")


class _Runtime:
    pass


def test_loaded_models_lru() -> None:
    lru = LoadedModels(2)
    a, b, c = (LoadedModel(key=k, runtime=_Runtime()) for k in "abc")  # type: ignore[arg-type]
    assert lru.put(a) == [] and lru.put(b) == []
    assert lru.get("a") is a  # a is now the most recent
    assert lru.put(c) == [b]
    assert lru.keys() == ["a", "c"] and lru.get("b") is None
    assert [m.key for m in lru.clear()] == ["a", "c"] and len(lru) == 0
    with pytest.raises(ValueError):
        LoadedModels(0)
