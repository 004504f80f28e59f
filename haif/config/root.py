"""``HaifConfig``: the root of the config tree, and what needs more than one section."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from haif.config._base import ConfigModel
from haif.config.cluster import RayConfig, RegionConfig, ShardingConfig
from haif.config.models import ModelConfig
from haif.config.operations import JobsConfig, QuotasConfig, ResilienceConfig, RolloutsConfig, UsageConfig
from haif.config.p2p import P2PConfig
from haif.config.server import AuthConfig, LimitsConfig, ServerConfig
from haif.config.storage import ArtifactsConfig, DatabaseConfig, DlqConfig, RedisConfig
from haif.config.telemetry import TelemetryConfig


class HaifConfig(ConfigModel):
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
    rollouts: RolloutsConfig = Field(
        default_factory=RolloutsConfig, description="Rollouts: canary versions, traffic weights, automatic rollback."
    )
    resilience: ResilienceConfig = Field(
        default_factory=ResilienceConfig, description="Health probes, breakers, retries."
    )
    sharding: ShardingConfig = Field(
        default_factory=ShardingConfig, description="Tenants' home regions."
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Telemetry.")
    p2p: P2PConfig = Field(default_factory=P2PConfig, description="P2P shim (Hyperswarm RPC).")
    base_dir: str | None = Field(
        None, description="Directory relative paths resolve against (the config file's repo root)."
    )

    @model_validator(mode="after")
    def _unique_models(self) -> HaifConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        # An adapter is served as BASE:NAME and as NAME alone: every such name names one thing.
        served = names + [f"{m.name}:{a.name}" for m in self.models for a in m.adapters]
        served += [a.name for m in self.models for a in m.adapters]
        dupes = sorted({n for n in served if served.count(n) > 1})
        if dupes:
            raise ValueError(f"model and adapter names must differ; used twice: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _p2p_workers_need_the_shim(self) -> HaifConfig:
        remote = [m.name for m in self.models if m.enabled and m.p2p_workers]
        if remote and not self.p2p.enabled:
            raise ValueError(
                f"models {', '.join(remote)} list p2p_workers: they are reached through the P2P shim; "
                "set p2p.enabled: true (HAIF_P2P__ENABLED=true)"
            )
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
        """Workers of ``model`` at start (at least one): ``workers`` (or
        ``autoscaling.min_workers``) per region, per tier (shared + dedicated). An autoscaler's
        further workers are placed when there is room, else wait as ``pending``."""
        per_pool = max(1, model.initial_workers)
        return per_pool * len(self.model_regions(model)) * (1 + len(model.dedicated_tenants))

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

    def p2p_seed_path(self) -> Path:
        """The P2P key seed file: ``p2p.seed_file`` (relative to ``base_dir``), else in state_dir."""
        if self.p2p.seed_file is None:
            return self.state_path() / "p2p" / "seed"
        path = Path(self.p2p.seed_file).expanduser()
        return path if path.is_absolute() else self.base_path() / path
