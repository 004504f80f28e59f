"""Where HAIF keeps things: the metadata store, Redis, the DLQ, the artifact store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from haif.config._base import NAME_VERSION_PATTERN, ConfigModel, RuntimeName


class DatabaseConfig(ConfigModel):
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


class RedisConfig(ConfigModel):
    url: str | None = Field(None, description="Redis URL (DLQ, rate limits); none in the embedded default.")
    socket_timeout_s: float = Field(2.0, gt=0, le=60, description="Socket deadline.")
    key_prefix: str = Field(
        "haif", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
        description="Prefix of every key HAIF writes.",
    )


class DlqConfig(ConfigModel):
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


class ReplicaConfig(ConfigModel):
    url: str = Field(
        ..., min_length=1, description="fsspec URL of the replica: a directory, `s3://bucket/prefix`, ..."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of this replica, over artifacts.storage_options."
    )


class DevArtifactConfig(ConfigModel):
    artifact: str = Field(..., pattern=NAME_VERSION_PATTERN, description="`name:version` it is published as.")
    source: str = Field(
        ..., min_length=1, description="Directory, or `python-package:PKG/SUBDIR`, published from."
    )
    build: Literal["tiny-llama"] | None = Field(
        None, description="Build this development model into `source` when it is missing."
    )
    runtime: RuntimeName | None = Field(
        None, description="Runtime hint recorded in the manifest."
    )


class ArtifactsConfig(ConfigModel):
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
