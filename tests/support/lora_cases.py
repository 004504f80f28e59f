"""LoRA fixtures shared by the unit tests, the integration fixtures and ``bench/lora.py``:
tiny-llama, real PEFT adapters of it (seeded, non-zero B), and a signed store holding them.

``LoraStore.build(root)`` writes two bases (tiny-llama with seed 0, and seed 1 as "another
base") and adapters, and publishes into a three-replica local store:

* ``tiny-llama:1`` and ``other-llama:1``, signed by the trusted key;
* ``lora-a:1``, ``lora-b:1``, ``lora-c:1``: adapters of tiny-llama, trusted key;
* ``lora-rogue:1``: an adapter of tiny-llama signed by a key nobody trusts;
* ``lora-other:1``: an adapter of other-llama (trained on another base), trusted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haif.artifacts import ArtifactRef, ArtifactStore, SigningKey, TrustPolicy
from haif.config import ArtifactsConfig
from haif.devmodels import build_tiny_llama, build_tiny_lora

BASE, OTHER_BASE = "tiny-llama:1", "other-llama:1"
ADAPTERS = {"lora-a": 1, "lora-b": 2, "lora-c": 3}  # name -> seed of its matrices
ROGUE, WRONG_BASE = "lora-rogue", "lora-other"


def build_models(root: Path) -> tuple[Path, dict[str, Path]]:
    """tiny-llama (seed 0) and its adapters lora-a/b/c under ``root`` (built once)."""
    base = build_tiny_llama(root / "tiny-llama")
    adapters = {name: root / "adapters" / name for name in ADAPTERS}
    for name, seed in ADAPTERS.items():
        if not (adapters[name] / "adapter_model.safetensors").exists():
            build_tiny_lora(adapters[name], base, seed=seed)
    return base, adapters


@dataclass
class LoraStore:
    root: Path
    key: SigningKey
    rogue: SigningKey
    base_dir: Path
    adapter_dirs: dict[str, Path]
    digests: dict[str, str] = field(default_factory=dict)  # artifact ref -> manifest digest

    def config(self, **changes: Any) -> ArtifactsConfig:
        data: dict[str, Any] = {
            "replicas": [str(self.root / "store" / f"r{i}") for i in (1, 2, 3)],
            "cache_dir": str(self.root / "cache"),
            "trusted_keys": [self.key.public_key.text()],
            "fsync": False,
        }
        data.update(changes)
        return ArtifactsConfig.model_validate(data)

    def store(self) -> ArtifactStore:
        return ArtifactStore.from_config(self.config())

    @classmethod
    def build(cls, root: Path) -> LoraStore:
        base_dir, adapter_dirs = build_models(root)
        made = cls(root, SigningKey.generate(), SigningKey.generate(), base_dir, adapter_dirs)
        made.digests = publish_all(made.store(), made.key, made.rogue, root, base_dir, adapter_dirs)
        return made


def publish_all(
    store: ArtifactStore, key: SigningKey, rogue: SigningKey, root: Path, base_dir: Path,
    adapter_dirs: dict[str, Path],
) -> dict[str, str]:
    """Publish the bases and adapters of the module docstring; their manifest digests."""
    trust = TrustPolicy(global_keys=(key.public_key,))
    digests: dict[str, str] = {}

    def publish(source: Path, ref: str, signer: SigningKey, base: str | None = None, **kw: Any) -> None:
        name, version = ref.split(":")
        adapter = store.adapter_of(ArtifactRef.parse(base), trust) if base else None
        digests[ref] = store.publish(source, name, version, signer, trust=trust, adapter=adapter, **kw).manifest_digest

    publish(base_dir, BASE, key, runtime={"runtime": "torch"})
    other = build_tiny_llama(root / "other-llama", seed=1)
    publish(other, OTHER_BASE, key, runtime={"runtime": "torch"})
    for name, path in adapter_dirs.items():
        publish(path, f"{name}:1", key, base=BASE)
    publish(adapter_dirs["lora-a"], f"{ROGUE}:1", rogue, base=BASE)
    wrong = build_tiny_lora(root / "adapters" / WRONG_BASE, other, seed=9)
    publish(wrong, f"{WRONG_BASE}:1", key, base=OTHER_BASE)
    return digests
