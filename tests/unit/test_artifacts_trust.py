"""One trust policy (haif.artifacts.trust): the CLI trusts what the server and its workers trust.

On the local config (configs/local.yaml), once the first start has published the dev models
signed by the development key (``haif.bootstrap.prepare``, what ``make serve`` runs before it
deploys), ``haif models verify tiny-llama:1`` accepts them; an adapter signed by another key
publishes against that base, and a worker's loader refuses it as untrusted, naming the key.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from haif.artifacts import ArtifactLoader, SigningKey, load_public_key, load_signing_key
from haif.artifacts.trust import dev_key_path, trusted_keys
from haif.cli.main import app
from haif.config import ArtifactsConfig, HaifConfig, load_config
from haif.devmodels import build_tiny_lora
from haif.exceptions import AdapterRejected
from tests.support.tiny import model_dir

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
LOCAL = ROOT / "configs" / "local.yaml"
# The local config as `make serve` runs it, less MiniLM's copy of its weights: tiny-llama alone.
ENV = {
    "HAIF_ARTIFACTS__DEV_PUBLISH": json.dumps(
        [{"artifact": "tiny-llama:1", "source": ".haif/models/tiny-llama", "build": "tiny-llama",
          "runtime": "torch"}]
    ),
    "HAIF_ARTIFACTS__FSYNC": "false",
}


@dataclass
class Served:
    """A directory the local config has started in once: the state `make serve` leaves."""

    root: Path
    config: HaifConfig


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    from haif.bootstrap import prepare

    root = tmp_path_factory.mktemp("local")
    # The dev_publish step's `build: tiny-llama`, done already (the session's build).
    shutil.copytree(model_dir(tmp_path_factory), root / ".haif" / "models" / "tiny-llama")
    config = load_config(LOCAL, environ={**ENV, "HAIF_BASE_DIR": str(root)})
    prepare(config)  # the first start: the dev key generated, tiny-llama:1 published with it
    return Served(root, config)


def haif(served: Served, *args: str) -> tuple[int, str]:
    env = {**ENV, "HAIF_BASE_DIR": str(served.root)}
    result = CliRunner().invoke(app, [*args, "--config", str(LOCAL)], env=env)
    return result.exit_code, result.output


def test_verify_accepts_what_the_server_published_with_its_dev_key(served: Served) -> None:
    code, out = haif(served, "models", "verify", "tiny-llama:1")
    assert code == 0, out
    path = dev_key_path(served.config.artifacts, served.root)
    assert path is not None and path.parent == served.root / ".haif" / "keys"
    dev = load_signing_key(path)
    assert dev.key_id in trusted_keys(served.config.artifacts, served.root).keys_for("tiny-llama")
    # --trusted-key: that key only, as before.
    code, out = haif(
        served, "models", "verify", "tiny-llama:1", "--trusted-key", dev.public_key.text()
    )
    assert code == 0, out
    other = SigningKey.generate().public_key.text()
    code, out = haif(served, "models", "verify", "tiny-llama:1", "--trusted-key", other)
    assert code == 1 and f"signed by key {dev.key_id}" in out, out


def test_an_adapter_by_another_key_publishes_against_the_base_and_a_worker_refuses_it(
    served: Served,
) -> None:
    root, config = served.root, served.config
    code, out = haif(served, "keys", "generate", "--out", str(root / "keys" / "team.key"))
    assert code == 0, out
    team = load_signing_key(root / "keys" / "team.key")
    base_dir = root / ".haif" / "models" / "tiny-llama"
    adapter = build_tiny_lora(root / "adapters" / "team-lora", base_dir, seed=5)
    code, out = haif(
        served, "models", "publish", str(adapter), "--name", "team-lora", "--version", "1",
        "--key", str(root / "keys" / "team.key"), "--base", "tiny-llama:1",
    )  # fmt: skip
    assert code == 0, out
    assert "adapter of: tiny-llama:1" in out

    # The worker's loader: the base loads (signed by the dev key), the adapter does not.
    loader = ArtifactLoader(config.artifacts, config.base_path(), "tiny-llama", ray_metrics=False)
    base = loader.acquire("tiny-llama:1")
    try:
        with pytest.raises(AdapterRejected) as refused:
            loader.acquire_adapter("team-lora:1", base.manifest_digest)
    finally:
        base.release()
    message = refused.value.message
    assert "[untrusted_signer]" in message and team.key_id in message, message
    assert team.key_id not in trusted_keys(config.artifacts, root).keys_for("team-lora")

    # The CLI says the same, and trusts it when told to.
    code, out = haif(served, "models", "verify", "team-lora:1")
    assert code == 1 and team.key_id in out, out
    pub = str(root / "keys" / "team.key.pub")
    code, out = haif(served, "models", "verify", "team-lora:1", "--trusted-key", pub)
    assert code == 0, out


def test_the_dev_key_is_read_never_created_and_restricted_names_keep_their_keys(
    tmp_path: Path,
) -> None:
    release = SigningKey.generate()
    config = ArtifactsConfig.model_validate({
        "replicas": ["store/r1"], "dev_signing_key": "keys/dev.key",
        "trusted_keys": [release.public_key.text()],
        "model_trusted_keys": {"locked": [release.public_key.text()]},
    })
    assert trusted_keys(config, tmp_path).keys_for("m") == {release.key_id: release.public_key}
    assert not (tmp_path / "keys").exists(), "no key is generated by reading the policy"

    from haif.artifacts.dev import ensure_signing_key

    dev = ensure_signing_key(tmp_path / "keys" / "dev.key")  # the server's first start
    policy = trusted_keys(config, tmp_path)
    assert set(policy.keys_for("m")) == {release.key_id, dev.key_id}
    assert set(policy.keys_for("locked")) == {release.key_id}, "model_trusted_keys: only its keys"
    (tmp_path / "keys" / "dev.key").unlink()  # only the public half on this machine: the same key
    assert set(trusted_keys(config, tmp_path).keys_for("m")) == {release.key_id, dev.key_id}
    # The dev key listed in trusted_keys as well: trusted once.
    keys = [*config.trusted_keys, dev.public_key.text()]
    listed = config.model_copy(update={"trusted_keys": keys})
    assert len(trusted_keys(listed, tmp_path).global_keys) == 2
    assert load_public_key(dev.public_key.text()) == dev.public_key
