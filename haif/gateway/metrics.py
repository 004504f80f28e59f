"""The Gateway's admission counters: in-process (``Gateway.stats``) and as Ray metrics.

Ray aggregates ``ray.util.metrics`` across replicas and exports them to Prometheus
(``haif_gateway_requests_total{outcome=...}``); the in-process numbers answer for one
replica without a metrics pipeline.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from haif.exceptions import AuthenticationFailed, HaifError, PermissionDenied, RateLimited

logger = logging.getLogger("haif.gateway")


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, AuthenticationFailed):
        return "unauthenticated"
    if isinstance(exc, PermissionDenied):
        return "forbidden"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, HaifError) and exc.status_code < 500:
        return "rejected"
    return "error"


class GatewayMetrics:
    def __init__(self, ray_metrics: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self._ray: Any = None
        if ray_metrics:
            from ray.util.metrics import Counter as RayCounter

            self._ray = RayCounter(
                "haif_gateway_requests",
                description="Requests seen by the Gateway's admission, by outcome.",
                tag_keys=("outcome",),
            )

    def outcome(self, name: str) -> None:
        self.counts[name] += 1
        if self._ray is not None:
            self._ray.inc(1, tags={"outcome": name})

    def refused(self, exc: BaseException) -> None:
        self.outcome(_outcome_of(exc))
