"""The Gateway's metrics: admission outcomes, quota rejections, requests and tokens by model.

They go to the platform's metrics pipeline (``haif.telemetry.metrics``: merged across
every Gateway replica, served at ``GET /metrics``); the admission outcomes are also
kept in-process for ``Gateway.stats`` (one replica's view, no pipeline needed).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from haif.exceptions import (
    AuthenticationFailed,
    HaifError,
    Overloaded,
    PermissionDenied,
    RateLimited,
    ServiceError,
    unwrap,
)
from haif.telemetry.metrics import ProcessMetrics, model_label, status_of

if TYPE_CHECKING:
    from collections.abc import Iterable

    from haif.envelope import Principal

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
    """What one Gateway replica records (pass ``metrics`` to push them; tests need not)."""

    def __init__(self, metrics: ProcessMetrics | None = None, models: Iterable[str] = ()) -> None:
        self.counts: Counter[str] = Counter()
        # (model, version) -> [finished, platform errors] since the Orchestrator last took them.
        self.outcomes: dict[tuple[str, str], list[int]] = {}
        self.registry = (metrics or ProcessMetrics("gateway")).registry
        self._known = frozenset(models)

    def take_outcomes(self) -> dict[str, dict[str, list[int]]]:
        """The outcome tallies since the last call, by model and version (for the
        Orchestrator's canary judge), and reset."""
        taken, self.outcomes = self.outcomes, {}
        out: dict[str, dict[str, list[int]]] = {}
        for (model, version), tally in taken.items():
            out.setdefault(model, {})[version] = tally
        return out

    def outcome(self, name: str) -> None:
        self.counts[name] += 1
        self.registry.inc("haif_gateway_admissions_total", (name,))

    def refused(self, exc: BaseException, principal: Principal | None = None) -> None:
        """An admission refusal; a rate limit or quota of a known tenant is counted for it."""
        self.outcome(_outcome_of(exc))
        if isinstance(exc, RateLimited) and principal is not None:
            self.registry.inc("haif_quota_rejections_total", (principal.tenant, exc.code))

    def finished(
        self,
        model: str,
        kind: str,
        exc: BaseException | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        version: str | None = None,
    ) -> None:
        """One inference request's end: refused, failed, or served (``exc`` None), by the
        ``version`` that ran it ("" when none did: refused before routing)."""
        label = model_label(model, self._known)
        self.registry.inc("haif_requests_total", (label, version or "", kind, status_of(exc)))
        if version is not None and label == model:
            # The canary's judge (rollouts.max_error_rate): platform errors per version.
            # Backpressure (429 overloaded) and the client's own errors are not the version's.
            tally = self.outcomes.setdefault((model, version), [0, 0])
            cause = unwrap(exc) if exc is not None else None
            platform = isinstance(cause, ServiceError) and not isinstance(cause, Overloaded)
            if exc is None or platform:
                tally[0] += 1
                tally[1] += int(platform)
        if prompt_tokens:
            self.registry.inc("haif_prompt_tokens_total", (label,), prompt_tokens)
        if completion_tokens:
            self.registry.inc("haif_completion_tokens_total", (label,), completion_tokens)
