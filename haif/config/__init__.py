"""HAIF configuration: one pydantic tree, loaded from YAML, overridden by ``HAIF_*``.

Overrides use ``__`` as the path separator and YAML syntax for values::

    HAIF_SERVER__PORT=8001
    HAIF_LIMITS__MAX_TOKENS=256
    HAIF_AUTH__DEV_API_KEY=my-development-key-0001

Values parse as YAML scalars: quote a string that YAML would read as a number
(``HAIF_AUTH__DEV_API_KEY='"1234567890123456"'``). Relative paths in the config
resolve against the directory the process starts in (``base_dir``).

Every model forbids unknown keys, so a typo is an error rather than a silently
ignored setting. Every timeout, queue and size has a named, bounded default.

One module per area, as vLLM's ``vllm/config/``; import from ``haif.config``:

- ``server``: the HTTP ingress and Serve deployments, request limits, authentication
- ``cluster``: the Ray cluster, regions, tenants' home regions
- ``runtimes``: per-runtime option sections of a model, vLLM engine defaults
- ``models``: a served model, its LoRA adapters, its autoscaling
- ``storage``: metadata store, Redis, DLQ, artifact store
- ``operations``: quotas, jobs, usage export, resilience, rollouts
- ``telemetry``, ``p2p``: traces, metrics and logs; the P2P shim
- ``root``: ``HaifConfig``, the root, and the checks that span sections
- ``loading``: ``load_config``, ``HAIF_*`` overrides
"""

from haif.config._base import (
    ARTIFACT_NAME_PATTERN,
    ARTIFACT_REF_PATTERN,
    NAME_VERSION_PATTERN,
    PACKAGE_SCHEME,
    RUNTIMES,
    RuntimeName,
    resolve_source,
)
from haif.config.cluster import RayConfig, RegionConfig, ShardingConfig
from haif.config.loading import (
    DEFAULT_CONFIG_PATH,
    ENV_CONFIG_PATH,
    ENV_PREFIX,
    apply_env_overrides,
    load_config,
)
from haif.config.models import (
    ADAPTER_NAME_PATTERN,
    ADAPTER_RUNTIMES,
    AdapterConfig,
    AutoscalingConfig,
    ModelConfig,
)
from haif.config.operations import (
    JobsConfig,
    QuotasConfig,
    ResilienceConfig,
    RolloutsConfig,
    UsageConfig,
)
from haif.config.p2p import P2P_MAX_MESSAGE_BYTES, P2PConfig
from haif.config.root import HaifConfig
from haif.config.runtimes import (
    CPU_STREAM_PIECES_PER_S,
    MAX_TENSOR_PARALLEL_SIZE,
    STREAM_BATCH_MS,
    VLLM_ENGINE_DEFAULTS,
    VLLM_ENGINE_OWNED,
    VLLM_GPU_MEMORY_UTILIZATION,
    EchoConfig,
    TorchConfig,
    VllmConfig,
)
from haif.config.server import AuthConfig, LimitsConfig, OidcIssuer, ServerConfig
from haif.config.storage import (
    ArtifactsConfig,
    DatabaseConfig,
    DevArtifactConfig,
    DlqConfig,
    RedisConfig,
    ReplicaConfig,
)
from haif.config.telemetry import TelemetryConfig

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "ADAPTER_RUNTIMES",
    "ARTIFACT_NAME_PATTERN",
    "ARTIFACT_REF_PATTERN",
    "CPU_STREAM_PIECES_PER_S",
    "DEFAULT_CONFIG_PATH",
    "ENV_CONFIG_PATH",
    "ENV_PREFIX",
    "MAX_TENSOR_PARALLEL_SIZE",
    "NAME_VERSION_PATTERN",
    "P2P_MAX_MESSAGE_BYTES",
    "PACKAGE_SCHEME",
    "RUNTIMES",
    "STREAM_BATCH_MS",
    "VLLM_ENGINE_DEFAULTS",
    "VLLM_ENGINE_OWNED",
    "VLLM_GPU_MEMORY_UTILIZATION",
    "AdapterConfig",
    "ArtifactsConfig",
    "AuthConfig",
    "AutoscalingConfig",
    "DatabaseConfig",
    "DevArtifactConfig",
    "DlqConfig",
    "EchoConfig",
    "HaifConfig",
    "JobsConfig",
    "LimitsConfig",
    "ModelConfig",
    "OidcIssuer",
    "P2PConfig",
    "QuotasConfig",
    "RayConfig",
    "RedisConfig",
    "RegionConfig",
    "ReplicaConfig",
    "ResilienceConfig",
    "RolloutsConfig",
    "RuntimeName",
    "ServerConfig",
    "ShardingConfig",
    "TelemetryConfig",
    "TorchConfig",
    "UsageConfig",
    "VllmConfig",
    "apply_env_overrides",
    "load_config",
    "resolve_source",
]
