"""Worker pools: the actors of one model, their load state, and how a request picks one."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from haif.exceptions import (
    GpuUnavailable,
    HaifError,
    ModelLoadFailed,
    ModelNotReady,
    WorkerUnavailable,
    unwrap,
)

if TYPE_CHECKING:
    from haif.config import ModelConfig
    from haif.orchestrator.placement import Placement

logger = logging.getLogger("haif.orchestrator")


@dataclass
class WorkerSlot:
    worker_id: str
    actor: Any  # ray.actor.ActorHandle
    load_ref: Any | None  # ObjectRef of the pending load() call, None once settled
    state: str = "loading"  # loading | ready | failed | dead
    error: str | None = None
    in_flight: int = 0
    load_started: float = field(default_factory=time.monotonic)


@dataclass
class ModelPool:
    model: ModelConfig
    placement: Placement | None
    placement_error: GpuUnavailable | None = None
    slots: list[WorkerSlot] = field(default_factory=list)
    _rr: itertools.count = field(default_factory=itertools.count)

    # --- state --------------------------------------------------------------------

    def refresh(self) -> None:
        """Settle finished load() calls without blocking."""
        pending = [s for s in self.slots if s.load_ref is not None]
        if not pending:
            return
        done, _ = ray.wait([s.load_ref for s in pending], num_returns=len(pending), timeout=0)
        done_set = set(done)
        for slot in pending:
            if slot.load_ref not in done_set:
                waited = time.monotonic() - slot.load_started
                if waited > self.model.load_timeout_s:
                    slot.state = "failed"
                    slot.error = f"load did not finish within load_timeout_s={self.model.load_timeout_s:g}"
                    slot.load_ref = None
                    ray.kill(slot.actor)
                    logger.error("worker %s: %s", slot.worker_id, slot.error)
                continue
            try:
                ray.get(slot.load_ref)
                slot.state = "ready"
            except Exception as exc:  # the worker's load failure, recorded and reported
                err = unwrap(exc)
                slot.state = "failed"
                slot.error = err.message if isinstance(err, HaifError) else f"{type(err).__name__}: {err}"
                logger.error("worker %s failed to load: %s", slot.worker_id, slot.error)
            slot.load_ref = None

    def status(self) -> dict[str, Any]:
        self.refresh()
        ready = sum(s.state == "ready" for s in self.slots)
        if self.placement_error is not None:
            state, error = "failed", self.placement_error.message
        elif ready:
            state, error = "ready", None
        elif any(s.state == "loading" for s in self.slots):
            state, error = "loading", None
        else:
            state = "failed"
            error = next((s.error for s in self.slots if s.error), "no workers")
        return {
            "state": state,
            "runtime": self.model.runtime,
            "device": "gpu" if self.placement and self.placement.use_gpu else "cpu",
            "workers": len(self.slots),
            "ready_workers": ready,
            "error": error,
        }

    # --- routing --------------------------------------------------------------------

    def pick(self) -> WorkerSlot:
        """The ready worker with the fewest requests in flight (round-robin among ties).

        Raises:
            GpuUnavailable / ModelLoadFailed: the model cannot be served at all.
            ModelNotReady: its workers are still loading.
        """
        if self.placement_error is not None:
            raise self.placement_error
        ready = [s for s in self.slots if s.state == "ready"]
        if not ready:
            self.refresh()
            ready = [s for s in self.slots if s.state == "ready"]
        if not ready:
            if any(s.state == "loading" for s in self.slots):
                raise ModelNotReady(f"model {self.model.name!r} is still loading")
            error = next((s.error for s in self.slots if s.error), None)
            if error:
                raise ModelLoadFailed(f"model {self.model.name!r} is not available: {error}")
            raise WorkerUnavailable(f"model {self.model.name!r} has no live worker")
        least = min(s.in_flight for s in ready)
        candidates = [s for s in ready if s.in_flight == least]
        return candidates[next(self._rr) % len(candidates)]

    def mark_dead(self, slot: WorkerSlot, reason: str) -> None:
        slot.state, slot.error = "dead", reason
        logger.error("worker %s is dead: %s", slot.worker_id, reason)
