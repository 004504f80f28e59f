"""One model's fleet as data: its versions' workers (``VersionFleet``), the rollout
applied to them and what the table and ``status`` say of it (``ModelFleet``).

Plain state: nothing here starts, probes or stops a worker (``haif.orchestrator.fleet_state``
does, asked by the health monitor and the control policies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from haif.orchestrator.autoscale import PoolScaler
from haif.orchestrator.fleet import RemoteSlot, Slot, pools_of
from haif.orchestrator.placement import Placement
from haif.orchestrator.rollout import Intent, weights
from haif.orchestrator.table import ModelRoutes

if TYPE_CHECKING:
    from haif.config import HaifConfig, ModelConfig
    from haif.exceptions import GpuUnavailable


class VersionFleet:
    """The workers of one version of a model: its slots, pool by pool, and their autoscalers."""

    def __init__(self, model: ModelConfig, slots: list[Slot], pools: list[tuple[str, str]]) -> None:
        self.model = model  # the model as this version serves it (ModelConfig.at_version)
        self.version = model.version
        self.slots = slots
        self.pools = pools
        # Workers each pool should have: ``workers``, or what its autoscaler decided.
        self.targets: dict[tuple[str, str], int] = {pool: model.initial_workers for pool in pools}
        self.scalers = (
            {pool: PoolScaler(model.autoscaling) for pool in pools} if model.autoscaling is not None else {}
        )
        self.error: str | None = None  # the version cannot run at all (no such artifact name)

    def in_pool(self, pool: tuple[str, str]) -> list[Slot]:
        return [s for s in self.slots if s.pool == pool]

    def active(self, pool: tuple[str, str]) -> list[Slot]:
        """The pool's workers that stay (not draining, not to be retired)."""
        return [s for s in self.in_pool(pool) if not s.retire and s.state != "draining"]

    def ready(self) -> int:
        return sum(s.state == "ready" for s in self.slots)

    def load(self, pool: tuple[str, str]) -> int:
        return sum(s.load for s in self.in_pool(pool) if s.state in ("ready", "draining"))

    def failure(self) -> str | None:
        """Why this version cannot serve, when none of its workers is ready and one failed."""
        if self.error is not None:
            return self.error
        if self.ready():
            return None
        return next((s.error for s in self.slots if s.state == "failed" and s.error), None)

    def ready_everywhere(self, regions: list[str]) -> bool:
        return all(any(s.state == "ready" and s.region == r for s in self.slots) for r in regions)


class ModelFleet:
    """One model: its versions' workers, the rollout applied to them, its placement."""

    def __init__(
        self, config: HaifConfig, model: ModelConfig, plan: Placement | GpuUnavailable,
        remote: list[RemoteSlot] | None = None,
    ) -> None:
        self.model = model
        self.placement = plan if isinstance(plan, Placement) else None
        self.placement_error = None if isinstance(plan, Placement) else plan
        self.pools = pools_of(config, model)
        self.regions = [r.name for r in config.model_regions(model)]
        self.versions: dict[str, VersionFleet] = {}
        self.intent = Intent(stable=model.version)
        self.canary_status: tuple[str, str | None] | None = None  # last reported to the store
        self.remote = remote or []  # remote P2P workers (of the stable version)
        self.ever_ready = False

    @property
    def slots(self) -> list[Slot]:
        return [s for v in self.versions.values() for s in v.slots]

    def canary_ready(self) -> bool:
        canary = self.versions.get(self.intent.canary) if self.intent.canary else None
        return canary is not None and canary.ready_everywhere(self.regions)

    def canary_state(self) -> tuple[str, str | None] | None:
        """(starting | ready | failed, reason) of the canary; None without one."""
        if self.intent.canary is None:
            return None
        canary = self.versions.get(self.intent.canary)
        if canary is None:
            return ("starting", None)
        if self.canary_ready():
            return ("ready", None)
        failure = canary.failure()
        if failure is not None:
            return ("failed", f"version {canary.version} gets no traffic: {failure}")
        pending = sum(s.state == "pending" for s in canary.slots)
        if pending:
            return ("starting", f"{pending} worker(s) waiting for room (GPU or CPU) in the cluster")
        return ("starting", None)

    def weights(self) -> tuple[tuple[str, int], ...]:
        return weights(self.intent, self.canary_ready())

    def scaled_to_zero(self) -> bool:
        auto = self.model.autoscaling
        return auto is not None and auto.min_workers == 0 and not any(
            s.state == "ready" for s in self.slots
        ) and not any(r.state == "ready" for r in self.remote)

    def last_decision(self) -> str | None:
        decisions = [
            d for v in self.versions.values() for d in (sc.last for sc in v.scalers.values()) if d is not None
        ]
        if not decisions:
            return None
        last = max(decisions, key=lambda d: d.at)
        return last.describe()

    def routes(self) -> ModelRoutes:
        workers = tuple(r for r in (s.route() for s in self.slots) if r is not None)
        workers += tuple(r.route(self.intent.stable) for r in self.remote)
        return ModelRoutes(
            name=self.model.name,
            kind=self.model.kind,
            workers=workers,
            device="gpu" if self.placement and self.placement.use_gpu else "cpu",
            error=next((s.error for s in self.slots if s.state == "failed" and s.error), None),
            unplaceable=self.placement_error.message if self.placement_error is not None else None,
            replacing=any(
                s.state in ("dead", "pending") or (s.state == "loading" and (s.deaths or self.ever_ready))
                for s in self.slots
            ),
            ever_ready=self.ever_ready,
            weights=self.weights(),
            stable=self.intent.stable,
            scaled_to_zero=self.scaled_to_zero(),
            autoscaler=self.last_decision(),
        )

    def status(self) -> dict[str, Any]:
        slots = self.slots
        ready = sum(s.state == "ready" for s in slots) + sum(r.state == "ready" for r in self.remote)
        if self.placement_error is not None and not ready:
            state, error = "failed", self.placement_error.message
        elif ready or self.scaled_to_zero():
            state, error = "ready", None
        elif any(s.state in ("loading", "dead", "pending") for s in slots):
            state, error = "loading", None  # dead workers are being replaced
        else:
            state = "failed"
            error = next((s.error for s in slots if s.error), "no workers")
        by_state: dict[str, int] = {}
        for s in slots:
            by_state[s.state] = by_state.get(s.state, 0) + 1
        canary = self.canary_state()
        return {
            "state": state,
            "runtime": self.model.runtime,
            "device": "gpu" if self.placement and self.placement.use_gpu else "cpu",
            "workers": len(slots),
            "ready_workers": ready,
            "workers_by_state": by_state,
            "in_flight": sum(s.load for s in slots),
            "regions": sorted({s.region for s in slots} | set(self.regions)),
            "p2p_workers": {r.worker_id: r.state for r in self.remote},
            "versions": {
                v.version: {
                    "workers_by_state": _count(s.state for s in v.slots),
                    "workers_by_region": _count(s.region for s in v.slots),
                    "targets": {"/".join(p): n for p, n in v.targets.items()},
                }
                for v in self.versions.values()
            },
            "weights": dict(self.weights()),
            "canary": None if canary is None else {"version": self.intent.canary, "state": canary[0],
                                                   "reason": canary[1], "weight": self.intent.weight},
            "scaled_to_zero": self.scaled_to_zero(),
            "autoscaler": self.last_decision(),
            "error": error,
        }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
