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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from haif.exceptions import ConfigError
from haif.protocol import MAX_CHOICES

ENV_PREFIX = "HAIF_"
ENV_CONFIG_PATH = "HAIF_CONFIG"
DEFAULT_CONFIG_PATH = "configs/local.yaml"
PACKAGE_SCHEME = "python-package:"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    host: str = Field("127.0.0.1", description="Address the HTTP Bridge listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP Bridge.")
    app_name: str = Field("haif", description="Name of the Ray Serve application.")
    bridge_replicas: int = Field(1, ge=1, le=64, description="Replicas of the HTTP Bridge.")
    gateway_replicas: int = Field(1, ge=1, le=64, description="Replicas of the Gateway.")
    orchestrator_replicas: int = Field(1, ge=1, le=16, description="Replicas of the Orchestrator.")
    max_ongoing_requests: int = Field(
        256, ge=1, le=100_000, description="Concurrent requests one Serve replica accepts."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="End-to-end deadline of one request (default)."
    )
    min_request_timeout_s: float = Field(
        0.05, gt=0, le=3600, description="Smallest deadline a client may ask for (X-Request-Timeout)."
    )
    max_request_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="Largest deadline a client may ask for (X-Request-Timeout)."
    )
    state_dir: str = Field(".haif", description="Directory for local state (dev key, caches).")
    access_log: bool = Field(
        False, description="Ray Serve per-call access logs in every replica (costly on the hot path)."
    )
    handle_transport: Literal["ray", "grpc"] = Field(
        "grpc",
        description="How the Bridge calls the Gateway and the Gateway the Orchestrator: Ray actor "
        "calls (objects by reference), or Serve's direct gRPC between replicas (by value).",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Ray Serve runs HTTP proxies: every node, or the head node only."
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="How HTTP reaches the Bridge: Serve's HTTP proxy actor, or HAProxy on host:port "
        "in front of the Bridge replicas' own HTTP servers (Ray Serve's direct ingress; the Ray "
        "cluster must run with RAY_SERVE_ENABLE_HA_PROXY=1, which `haif serve` sets for a cluster "
        "it starts).",
    )
    control_resource: str | None = Field(
        None,
        description="Ray custom resource of the nodes that run the Bridge, Gateway and Orchestrator "
        "replicas (unset: any node).",
    )


class LimitsConfig(_Model):
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest accepted HTTP body (413 above)."
    )
    max_prompt_tokens: int = Field(
        4096, ge=1, le=1_048_576, description="Largest prompt, in the model's tokens (422 above)."
    )
    max_tokens: int = Field(
        2048, ge=1, le=1_048_576, description="Largest `max_tokens` a request may ask for."
    )
    default_max_tokens: int = Field(
        128, ge=1, le=1_048_576, description="`max_tokens` when a request gives none."
    )
    max_embedding_inputs: int = Field(
        256, ge=1, le=100_000, description="Most inputs in one embeddings request."
    )
    max_prompts_per_request: int = Field(
        16, ge=1, le=1024, description="Most prompts in one /v1/completions request."
    )
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Most `stop` strings.")
    max_choices: int = Field(
        8, ge=1, le=MAX_CHOICES, description="Most choices per prompt (`n`); each is a generation of its own."
    )
    object_ref_threshold_bytes: int = Field(
        64 * 1024,
        ge=0,
        le=1024**3,
        description="Payloads at least this large cross Ray hops as object references.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        return self


class AuthConfig(_Model):
    backend: Literal["database", "static"] = Field(
        "database",
        description="database: tenants and API tokens in the metadata store; "
        "static: only dev_api_key, no quotas, jobs or usage (benchmark baseline).",
    )
    dev_api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Development API key of the `default` tenant; generated into state_dir when unset.",
    )
    dev_tenant: str = Field("default", description="Tenant the development key belongs to.")
    token_cache_ttl_s: float = Field(
        5.0, ge=0, le=3600,
        description="How long a token lookup is cached: a revoked token stops working within this time.",
    )
    token_cache_max_entries: int = Field(
        10_000, ge=1, le=10_000_000, description="Token lookups (good and bad) kept per Gateway replica."
    )


class RayConfig(_Model):
    address: str | None = Field(
        None, description="Ray cluster to join; a local one is started when unset and RAY_ADDRESS is unset."
    )
    namespace: str = Field("haif", description="Ray namespace of HAIF's actors.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started cluster.")
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with a local cluster.")


# A stream's pieces after the first leave a worker at most this often (Ray Serve LLM
# batches streamed outputs every 50 ms the same way): each piece is a message on every hop.
STREAM_BATCH_MS = 50.0
# On a CPU worker the engine computes on the cores the hops use too: past this many pieces
# a second (each costs a few ms of CPU over the hops), a worker's streams share this
# budget instead of starving the engine (bench/engine.py: 2x the tokens/s at 32 streams).
CPU_STREAM_PIECES_PER_S = 100.0
ARTIFACT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
ARTIFACT_REF_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._+-]{0,127}|sha256:[0-9a-f]{64})$"


def resolve_source(spec: str, base: Path | None = None) -> Path:
    """A directory on this node: a path (relative to ``base``) or ``python-package:PKG/SUBDIR``.

    Raises:
        ConfigError: the package is not installed.
    """
    if spec.startswith(PACKAGE_SCHEME):
        package, _, sub = spec[len(PACKAGE_SCHEME):].partition("/")
        try:
            root = Path(str(resources.files(package)))
        except ModuleNotFoundError as exc:
            raise ConfigError(f"package {package!r} of {spec!r} is not installed") from exc
        return root / sub if sub else root
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path.resolve()


class ModelConfig(_Model):
    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$",
                      description="Model id clients send in `model`.")
    runtime: Literal["echo", "torch", "embeddings", "vllm"] = Field(
        ..., description="Runtime that executes the model."
    )
    path: str | None = Field(
        None,
        description="Model directory, or `python-package:PKG/SUBDIR` for weights shipped in a package.",
    )
    artifact: str | None = Field(
        None,
        pattern=ARTIFACT_REF_PATTERN,
        description="Signed artifact served: `name:version` or `sha256:<manifest digest>` (instead of `path`).",
    )
    version: str = Field("1", description="Version of the model served.")
    build: Literal["tiny-llama"] | None = Field(
        None, description="Build this development model into `path` on start when it is missing."
    )
    enabled: bool = Field(True, description="Serve this model.")
    workers: int = Field(1, ge=1, le=256, description="Worker actors of this model.")
    device: Literal["cpu", "gpu", "auto"] = Field(
        "auto", description="cpu, gpu (one GPU per worker), or auto (gpu when the cluster has one)."
    )
    allow_cpu_fallback: bool = Field(
        False, description="With device=gpu on a cluster without GPUs, run on CPU instead of failing."
    )
    num_cpus: float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker actor.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights dtype.")
    max_model_len: int = Field(2048, ge=16, le=1_048_576, description="Prompt + completion tokens.")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests batched into one step.")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="Wait for a batch to fill.")
    max_concurrency: int = Field(
        512, ge=1, le=100_000, description="Requests one worker actor accepts at once."
    )
    token_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="echo runtime only: delay per streamed token."
    )
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads.")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vllm: GPUs one worker spans (a placement group of that many)."
    )
    gpu_memory_utilization: float = Field(
        0.9, ge=0.05, le=0.99, description="vllm: share of each GPU's memory the engine may take."
    )
    kv_cache_space_gib: int = Field(
        1, ge=1, le=4096, description="vllm on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    enforce_eager: bool = Field(False, description="vllm: no CUDA graphs / compilation.")
    cpu_engine_nice: int = Field(
        19, ge=0, le=19,
        description=(
            "vllm on CPU: niceness of the engine's processes (scheduler, model worker). They "
            "busy-poll between steps; on cores they share with the serving path they delay "
            "its every wake-up, and the engine then runs nearly empty batches. At the lowest "
            "priority the serving path preempts them at once (10 is not enough); they still "
            "get every cycle nothing else wants. 0: same priority."
        ),
    )
    stream_interval: int = Field(
        1, ge=1, le=1024,
        description=(
            "vllm: tokens per streamed piece after the first (vLLM's --stream-interval); "
            "1 streams every token, more trades smoother streams for throughput."
        ),
    )
    stream_batch_ms: float = Field(
        STREAM_BATCH_MS, ge=0, le=1000,
        description=(
            "Streams: after the first token (sent at once), a piece leaves the worker at most "
            "every this many ms, carrying every token made since the last one; the last piece "
            "never waits. 0 sends each token as it comes (each costs a message on every hop)."
        ),
    )
    stream_pieces_per_s: float | None = Field(
        None, ge=0, le=100_000,
        description=(
            "Streams: at most this many pieces a second from one worker, all its streams "
            "together (each stream's pieces are spaced wider as streams are added, up to 1 s "
            "apart); bounds the CPU the hops spend per worker. Unset: "
            f"{CPU_STREAM_PIECES_PER_S:g} on CPU workers (the engine and the hops share the "
            "node's cores), no bound on GPU workers. 0: no bound."
        ),
    )
    task: Literal["generate", "embed"] | None = Field(
        None, description="vllm: serve the model for generation or as a pooling/embedding model."
    )
    load_timeout_s: float = Field(600.0, gt=0, le=7200, description="Model load deadline.")
    max_queued: int = Field(
        256, ge=0, le=100_000,
        description="Requests that may wait for a free worker slot; beyond, 429 with Retry-After at once.",
    )
    regions: list[str] | None = Field(
        None, description="Regions that run `workers` workers each (default: the first region)."
    )
    dedicated_tenants: list[str] = Field(
        default_factory=list,
        description="Tenants with a pool of their own (`workers` per region) that no one else uses.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path and self.artifact:
            raise ValueError(f"model {self.name!r}: give `artifact` or `path`, not both")
        if self.runtime != "echo" and not (self.path or self.artifact):
            raise ValueError(
                f"model {self.name!r}: runtime {self.runtime!r} needs `artifact` (or `path` in development)"
            )
        if self.build is not None and not self.path:
            raise ValueError(f"model {self.name!r}: `build` needs `path`")
        return self

    @property
    def kind(self) -> Literal["generate", "embed"]:
        if self.runtime == "embeddings" or (self.runtime == "vllm" and self.task == "embed"):
            return "embed"
        return "generate"

    def resolved_path(self, base: Path | None = None) -> Path:
        """The model directory on this node.

        Raises:
            ConfigError: the path names nothing.
        """
        if self.path is None:
            raise ConfigError(f"model {self.name!r} has no path")
        try:
            return resolve_source(self.path, base)
        except ConfigError as exc:
            raise ConfigError(f"model {self.name!r}: {exc.message}") from exc


class DatabaseConfig(_Model):
    url: str = Field(
        "sqlite:///.haif/haif.db",
        min_length=1,
        description="SQLAlchemy URL of the metadata store (postgresql+psycopg://... or sqlite:///PATH).",
    )
    pool_size: int = Field(10, ge=1, le=1000, description="Connections per process.")
    max_overflow: int = Field(10, ge=0, le=1000, description="Connections above pool_size under bursts.")
    pool_timeout_s: float = Field(10.0, gt=0, le=300, description="Wait for a free pooled connection.")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="Connect deadline.")
    statement_timeout_ms: int = Field(
        10_000, ge=0, le=3_600_000, description="PostgreSQL statement_timeout per connection (0: none)."
    )
    auto_migrate: bool = Field(
        True, description="Upgrade the schema to the latest revision on start (haif serve, CLI commands)."
    )

    def resolved_url(self, base: Path | None = None) -> str:
        """The URL with a relative SQLite path resolved against ``base``."""
        prefix, sep, path = self.url.partition(":///")
        if not sep or not prefix.startswith("sqlite") or not path or path.startswith("/") or path == ":memory:":
            return self.url
        return f"{prefix}:///{(base or Path.cwd()) / path}"


class RedisConfig(_Model):
    url: str | None = Field(None, description="Redis URL (DLQ, rate limits); none in the embedded default.")
    socket_timeout_s: float = Field(2.0, gt=0, le=60, description="Socket deadline.")
    key_prefix: str = Field(
        "haif", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
        description="Prefix of every key HAIF writes.",
    )


class QuotasConfig(_Model):
    rate_limit_backend: Literal["auto", "redis", "database"] = Field(
        "auto", description="Where requests-per-minute are counted; auto: Redis when redis.url is set."
    )
    prompt_bytes_per_token: float = Field(
        4.0, gt=0, le=64,
        description="Prompt estimate for token reservations (bytes per token); settlement corrects it.",
    )
    redis_unavailable: Literal["database", "reject"] = Field(
        "database",
        description="Redis down: count requests per minute in the metadata store instead (database) "
        "or refuse requests with 503 (reject).",
    )
    redis_retry_after_s: float = Field(
        5.0, ge=0, le=600,
        description="After Redis failed, how long the fallback is used before Redis is tried again.",
    )
    lease_fraction: float = Field(
        0.02, ge=0, le=0.25,
        description="PostgreSQL: the share of each of a tenant's limits one Gateway replica may lease "
        "at once, to admit requests with no database round trip (0: every request is counted on its own).",
    )
    lease_max_requests: int = Field(
        256, ge=2, le=1_000_000, description="Most requests one lease hands out."
    )
    lease_idle_s: float = Field(
        0.5, gt=0, le=60, description="A lease unused this long gives back what it did not hand out."
    )
    lease_max_s: float = Field(5.0, gt=0, le=59, description="Longest life of a lease.")


class JobsConfig(_Model):
    idempotency_ttl_s: float = Field(
        86_400.0, ge=60, le=30 * 86_400, description="How long an Idempotency-Key is remembered."
    )
    max_idempotency_key_chars: int = Field(
        255, ge=8, le=255, description="Longest accepted Idempotency-Key header."
    )
    idempotency_poll_ms: float = Field(
        50.0, ge=1, le=10_000, description="Poll interval of a duplicate waiting for the first execution."
    )
    max_stored_response_bytes: int = Field(
        16 * 1024**2, ge=1024, le=1024**3,
        description="Largest response kept for Idempotency-Key replays (larger: 413 on such requests).",
    )
    mark_running_after_s: float = Field(
        1.0, ge=0.05, le=600,
        description="Jobs still executing after this long are marked running (in batches, off the hot path).",
    )
    stale_after_s: float = Field(
        60.0, ge=1, le=86_400,
        description="Unsettled jobs older than request_timeout_s plus this are failed and their quota released.",
    )
    sweep_interval_s: float = Field(5.0, ge=0.1, le=3600, description="Background job upkeep period.")
    settle_queue_max: int = Field(
        100_000, ge=1, le=10_000_000,
        description="Settlements (and DLQ entries) a Gateway replica keeps to retry while the store is down.",
    )
    settle_retry_initial_s: float = Field(
        0.1, gt=0, le=60, description="First retry delay of a settlement the store refused (doubles, with jitter)."
    )
    settle_retry_max_s: float = Field(5.0, gt=0, le=600, description="Largest settlement retry delay.")


class DlqConfig(_Model):
    backend: Literal["auto", "redis", "database"] = Field(
        "auto",
        description="Where dead letters go: Redis Streams (falling back to the metadata store while "
        "Redis is down) or the metadata store's table; auto: redis when redis.url is set.",
    )
    stream: str = Field(
        "dlq", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
        description="Name of the Redis stream, under redis.key_prefix.",
    )
    max_entries: int = Field(
        100_000, ge=1, le=100_000_000,
        description="Redis stream MAXLEN: the oldest entries beyond it are dropped.",
    )
    max_body_bytes: int = Field(
        1024**2, ge=1024, le=256 * 1024**2,
        description="Largest request body kept with an entry (larger: truncated, and not replayable).",
    )
    body_fetch_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Deadline to fetch a body passed by reference (object store) for its entry.",
    )


class UsageConfig(_Model):
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", description="Billing webhook that receives usage batches (POST, JSON)."
    )
    batch_size: int = Field(500, ge=1, le=100_000, description="Usage records per webhook batch.")
    interval_s: float = Field(5.0, ge=0.05, le=3600, description="How often new usage is batched and sent.")
    timeout_s: float = Field(10.0, gt=0, le=300, description="Deadline of one webhook POST.")
    backoff_initial_s: float = Field(0.5, gt=0, le=600, description="First retry delay (doubles, with jitter).")
    backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Largest retry delay.")
    lease_s: float = Field(
        120.0, gt=0, le=86_400, description="A batch claimed by an exporter that died is re-sent after this."
    )


class ReplicaConfig(_Model):
    url: str = Field(
        ..., min_length=1, description="fsspec URL of the replica: a directory, `s3://bucket/prefix`, ..."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of this replica, over artifacts.storage_options."
    )


class DevArtifactConfig(_Model):
    artifact: str = Field(..., pattern=NAME_VERSION_PATTERN, description="`name:version` it is published as.")
    source: str = Field(
        ..., min_length=1, description="Directory, or `python-package:PKG/SUBDIR`, published from."
    )
    build: Literal["tiny-llama"] | None = Field(
        None, description="Build this development model into `source` when it is missing."
    )
    runtime: Literal["echo", "torch", "embeddings", "vllm"] | None = Field(
        None, description="Runtime hint recorded in the manifest."
    )


class ArtifactsConfig(_Model):
    """The artifact store: signed manifests and sha256 blobs on replicas, a cache per node."""

    replicas: list[str | ReplicaConfig] = Field(
        default_factory=lambda: [".haif/artifacts/replica-1", ".haif/artifacts/replica-2",
                                 ".haif/artifacts/replica-3"],
        min_length=1,
        max_length=32,
        description="fsspec URLs of the replicas (relative paths: local directories), read in this order.",
    )
    write_quorum: int | None = Field(
        None, ge=1, le=32, description="Replicas a publish must reach to succeed (default: a majority)."
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. `{s3: {endpoint_url: ..., key: ..., secret: ...}}`.",
    )
    cache_dir: str = Field(".haif/cache", description="Per-node content-addressed cache, shared by its workers.")
    cache_max_bytes: int = Field(
        20 * 1024**3, ge=1024**2, le=1024**5, description="Cache size cap; unpinned entries are evicted LRU."
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Public keys trusted to sign any artifact: `ed25519:<base64>` or a public key file.",
    )
    model_trusted_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per artifact name: the only keys trusted for it (instead of trusted_keys).",
    )
    dev_signing_key: str | None = Field(
        None,
        description="Development signing key, generated when missing; trusted, signs dev_publish. "
        "Leave unset in production.",
    )
    dev_publish: list[DevArtifactConfig] = Field(
        default_factory=list,
        description="Bundled models published on start (idempotent), signed by dev_signing_key.",
    )
    chunk_bytes: int = Field(
        8 * 1024**2, ge=64 * 1024, le=256 * 1024**2, description="Unit of streamed reads, hashes and writes."
    )
    max_parallel_transfers: int = Field(
        4, ge=1, le=64, description="Blobs transferred at once by one pull, publish or repair."
    )
    loaded_models_max: int = Field(
        2, ge=1, le=64, description="Loaded models a worker keeps in memory (LRU); a warm one skips loading."
    )
    lock_timeout_s: float = Field(
        900.0, gt=0, le=86_400, description="Longest wait for another process's download of the same blob."
    )
    fsync: bool = Field(True, description="fsync cached blobs before they become visible (crash-safe cache).")
    rehash_cache_hits: bool = Field(
        False,
        description="Re-hash cached blobs on every load (default: only when their recorded inode, size "
        "or times changed).",
    )

    @model_validator(mode="after")
    def _quorum_fits(self) -> ArtifactsConfig:
        if self.write_quorum is not None and self.write_quorum > len(self.replicas):
            raise ValueError("artifacts.write_quorum exceeds the number of replicas")
        if self.dev_publish and not self.dev_signing_key:
            raise ValueError("artifacts.dev_publish needs artifacts.dev_signing_key")
        return self

    def quorum(self) -> int:
        return self.write_quorum if self.write_quorum is not None else len(self.replicas) // 2 + 1

    def replica_configs(self) -> list[ReplicaConfig]:
        """Every replica as a ReplicaConfig, global storage options merged under its own."""
        out = []
        for replica in self.replicas:
            spec = replica if isinstance(replica, ReplicaConfig) else ReplicaConfig(url=replica)
            protocol = spec.url.split("://", 1)[0] if "://" in spec.url else "file"
            options = {**self.storage_options.get(protocol, {}), **spec.storage_options}
            out.append(spec.model_copy(update={"storage_options": options}))
        return out


class RegionConfig(_Model):
    name: str = Field(..., min_length=1, max_length=64, description="Region name.")
    resource: str | None = Field(None, description="Ray custom resource that marks this region's nodes.")


class ResilienceConfig(_Model):
    health_check_period_s: float = Field(
        1.0, ge=0.05, le=300, description="How often the Orchestrator probes each worker."
    )
    health_check_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A probe that takes longer counts as failed."
    )
    unhealthy_after_failures: int = Field(
        5, ge=1, le=1000, description="Failed probes in a row after which a worker is replaced."
    )
    breaker_failure_threshold: int = Field(
        3, ge=1, le=1000, description="Failures in a row that open a worker's circuit breaker."
    )
    breaker_open_s: float = Field(
        5.0, gt=0, le=3600, description="How long an open breaker refuses work before a trial call."
    )
    breaker_half_open_calls: int = Field(
        1, ge=1, le=1000, description="Trial calls a half-open breaker lets through."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Tries per request (the first plus retries), within its deadline."
    )
    retry_backoff_initial_ms: float = Field(
        20.0, ge=0, le=60_000, description="Backoff cap before the first retry (full jitter)."
    )
    retry_backoff_max_ms: float = Field(
        1000.0, ge=0, le=600_000, description="Largest backoff cap between retries."
    )
    replace_dead_workers: bool = Field(True, description="Start a new worker in place of a dead one.")
    replacement_backoff_max_s: float = Field(
        30.0, ge=0, le=3600,
        description="Largest wait before replacing a worker that keeps dying (doubles per death).",
    )
    overloaded_retry_after_s: float = Field(
        1.0, gt=0, le=3600, description="Retry-After sent with 429 when a model's queue is full."
    )


class ShardingConfig(_Model):
    home_regions: dict[str, str] = Field(
        default_factory=dict,
        description="Tenant name → home region; its requests go there first (default: the first region).",
    )


class TelemetryConfig(_Model):
    service_name: str = Field("haif", description="OpenTelemetry service name prefix.")
    otlp_endpoint: str | None = Field(None, description="OTLP endpoint; no export when unset.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    metrics_enabled: bool = Field(
        True, description="Record platform metrics and serve them at GET /metrics (503 when off)."
    )
    metrics_push_interval_s: float = Field(
        1.0, ge=0.05, le=60,
        description="How often each process pushes its cumulative metrics to the aggregator actor.",
    )
    metrics_stale_after_s: float = Field(
        10.0, ge=0.5, le=3600,
        description="Gauges of a process silent this long are dropped (its counters are kept).",
    )
    metrics_retire_after_s: float = Field(
        3600.0, ge=10, le=7 * 86_400,
        description="A process silent this long is folded into the totals and forgotten.",
    )
    metrics_max_processes: int = Field(
        4096, ge=16, le=1_000_000,
        description="Processes the aggregator tracks; beyond it the longest-silent are folded in.",
    )
    metrics_scrape_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Deadline of GET /metrics for the aggregator's answer (503 after)."
    )

    otlp_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None,
        description="OTLP transport; unset: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.",
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of new traces recorded; a client's traceparent sampled flag is followed.",
    )
    export_interval_ms: int | None = Field(
        None, ge=10, le=60_000,
        description="Delay between span exports; unset: OTEL_BSP_SCHEDULE_DELAY, else 5000.",
    )
    max_queued_spans: int | None = Field(
        None, ge=64, le=1_000_000,
        description="Spans a process buffers for export (then drops); unset: OTEL_BSP_MAX_QUEUE_SIZE, else 2048.",
    )
    json_logs: bool = Field(
        True, description="One JSON object per log line, with request id, trace id, span id, tenant."
    )

    @model_validator(mode="after")
    def _metrics_timing(self) -> TelemetryConfig:
        if self.metrics_stale_after_s < 2 * self.metrics_push_interval_s:
            raise ValueError(
                "telemetry.metrics_stale_after_s must be at least twice metrics_push_interval_s"
            )
        if self.metrics_retire_after_s <= self.metrics_stale_after_s:
            raise ValueError("telemetry.metrics_retire_after_s must exceed metrics_stale_after_s")
        return self


class HaifConfig(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP and Serve settings.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Authentication.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    models: list[ModelConfig] = Field(default_factory=list, description="Models served.")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig, description="Metadata store.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis.")
    quotas: QuotasConfig = Field(default_factory=QuotasConfig, description="Quota enforcement.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Job records and idempotency.")
    usage: UsageConfig = Field(default_factory=UsageConfig, description="Usage export.")
    dlq: DlqConfig = Field(default_factory=DlqConfig, description="Dead-letter queue.")
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig, description="Artifact store.")
    regions: list[RegionConfig] = Field(
        default_factory=lambda: [RegionConfig(name="local")], min_length=1, description="Regions."
    )
    resilience: ResilienceConfig = Field(
        default_factory=ResilienceConfig, description="Health probes, breakers, retries."
    )
    sharding: ShardingConfig = Field(
        default_factory=ShardingConfig, description="Tenants' home regions."
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Telemetry.")
    base_dir: str | None = Field(
        None, description="Directory relative paths resolve against (the config file's repo root)."
    )

    @model_validator(mode="after")
    def _unique_models(self) -> HaifConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _redis_for_rate_limits(self) -> HaifConfig:
        if self.quotas.rate_limit_backend == "redis" and not self.redis.url:
            raise ValueError("quotas.rate_limit_backend is redis but redis.url is unset")
        return self

    @model_validator(mode="after")
    def _known_regions(self) -> HaifConfig:
        known = {r.name for r in self.regions}
        if len(known) != len(self.regions):
            raise ValueError("duplicate region names")
        if self.server.min_request_timeout_s > self.server.max_request_timeout_s:
            raise ValueError("server.min_request_timeout_s exceeds server.max_request_timeout_s")
        for model in self.models:
            unknown = sorted(set(model.regions or []) - known)
            if unknown:
                raise ValueError(f"model {model.name!r} names unknown regions: {', '.join(unknown)}")
        for tenant, region in self.sharding.home_regions.items():
            if region not in known:
                raise ValueError(f"sharding.home_regions: tenant {tenant!r} names unknown region {region!r}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def model_regions(self, model: ModelConfig) -> list[RegionConfig]:
        """The regions that run ``model``'s workers, in config order."""
        names = model.regions or [self.regions[0].name]
        return [r for r in self.regions if r.name in names]

    def total_workers(self, model: ModelConfig) -> int:
        """Workers of ``model`` in all: ``workers`` per region, per tier (shared + dedicated)."""
        return model.workers * len(self.model_regions(model)) * (1 + len(model.dedicated_tenants))

    def home_region(self, tenant: str | None) -> str:
        """Where ``tenant``'s requests go first."""
        if tenant is not None and tenant in self.sharding.home_regions:
            return self.sharding.home_regions[tenant]
        return self.regions[0].name

    def base_path(self) -> Path:
        return Path(self.base_dir) if self.base_dir else Path.cwd()

    def database_url(self) -> str:
        """The metadata store's URL, a relative SQLite path resolved against ``base_dir``."""
        return self.database.resolved_url(self.base_path())

    @model_validator(mode="after")
    def _redis_for_dlq(self) -> HaifConfig:
        if self.dlq.backend == "redis" and not self.redis.url:
            raise ValueError("dlq.backend is redis but redis.url is unset")
        return self

    def dlq_on_redis(self) -> bool:
        """Whether dead letters go to Redis Streams (else to the metadata store's table)."""
        return self.dlq.backend == "redis" or (self.dlq.backend == "auto" and self.redis.url is not None)

    def rate_limits_on_redis(self) -> bool:
        """Whether requests per minute are counted in Redis (else in the metadata store)."""
        backend = self.quotas.rate_limit_backend
        return backend == "redis" or (backend == "auto" and self.redis.url is not None)

    def state_path(self) -> Path:
        path = Path(self.server.state_dir)
        return path if path.is_absolute() else self.base_path() / path


def _parse_env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``HAIF_A__B=value`` applied at path ``a.b``."""
    result: dict[str, Any] = dict(data)
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or key == ENV_CONFIG_PATH:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX):].split("__") if part]
        if not path or path[0] not in HaifConfig.model_fields:
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return result


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> HaifConfig:
    """Load the config file at ``path`` (or ``$HAIF_CONFIG``, or the default) with overrides.

    Raises:
        ConfigError: the file is missing, not YAML, or does not validate.
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path or environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {config_path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {config_path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {config_path} must be a mapping at the top level")
    data = apply_env_overrides(data, environ)
    data.setdefault("base_dir", str(Path.cwd()))
    try:
        return HaifConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {config_path} is invalid:\n{exc}") from exc
