"""Where and how a process pushes its metrics: shared by the pusher and the metrics API.

Its own module so that ``_actor`` (the aggregator and the pusher) and ``metrics`` (what
components call) both depend on it instead of on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import HaifConfig


@dataclass(frozen=True)
class MetricsTarget:
    """Where and how a process pushes its metrics (picklable: it travels to worker actors)."""

    enabled: bool = False
    actor_name: str = "haif-metrics"
    namespace: str = "haif"
    push_interval_s: float = 1.0
    stale_after_s: float = 10.0
    retire_after_s: float = 3600.0
    max_processes: int = 4096
    scrape_timeout_s: float = 2.0

    @classmethod
    def from_config(cls, config: HaifConfig) -> MetricsTarget:
        t = config.telemetry
        return cls(
            enabled=t.metrics_enabled,
            actor_name=f"{config.server.app_name}-metrics",
            namespace=config.ray.namespace,
            push_interval_s=t.metrics_push_interval_s,
            stale_after_s=t.metrics_stale_after_s,
            retire_after_s=t.metrics_retire_after_s,
            max_processes=t.metrics_max_processes,
            scrape_timeout_s=t.metrics_scrape_timeout_s,
        )
