"""The Ray cluster, its regions, and tenants' home regions."""

from __future__ import annotations

from pydantic import Field

from haif.config._base import ConfigModel


class RayConfig(ConfigModel):
    address: str | None = Field(
        None, description="Ray cluster to join; a local one is started when unset and RAY_ADDRESS is unset."
    )
    namespace: str = Field("haif", description="Ray namespace of HAIF's actors.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started cluster.")
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with a local cluster.")


class RegionConfig(ConfigModel):
    name: str = Field(..., min_length=1, max_length=64, description="Region name.")
    resource: str | None = Field(None, description="Ray custom resource that marks this region's nodes.")


class ShardingConfig(ConfigModel):
    home_regions: dict[str, str] = Field(
        default_factory=dict,
        description="Tenant name → home region; its requests go there first (default: the first region).",
    )
