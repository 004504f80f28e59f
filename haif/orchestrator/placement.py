"""Where worker actors run: GPU pinning, CPU fallback, and fail-fast on impossible asks.

A worker on a GPU reserves exactly one (``num_gpus=1``): Ray then gives each worker
its own device id and sets ``CUDA_VISIBLE_DEVICES`` for it. Placement is decided
once per model from the cluster's resources, before any actor is created, so that a
model that cannot be placed fails at once with a message that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from haif.exceptions import GpuUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from haif.config import ModelConfig


def gpus_per_worker(model: ModelConfig) -> int:
    """GPUs one worker of ``model`` spans: its tensor-parallel size for vLLM, else one."""
    return model.tensor_parallel_size if model.runtime == "vllm" else 1


@dataclass(frozen=True)
class Placement:
    model: str
    use_gpu: bool
    num_cpus: float
    fell_back_to_cpu: bool = False
    gpus_per_worker: int = 1

    @property
    def needs_placement_group(self) -> bool:
        """A tensor-parallel worker reserves its GPUs as one placement group of bundles."""
        return self.use_gpu and self.gpus_per_worker > 1

    def placement_group_bundles(self) -> list[dict[str, float]]:
        return [{"GPU": 1, "CPU": 1}] * self.gpus_per_worker

    def actor_options(self, max_concurrency: int) -> dict[str, Any]:
        # With a placement group, the GPUs belong to the bundles (the engine's
        # tensor-parallel workers take them); the worker actor itself holds none.
        return {
            "num_gpus": 1 if self.use_gpu and not self.needs_placement_group else 0,
            "num_cpus": self.num_cpus,
            "max_concurrency": max_concurrency,
            # A worker that dies is replaced by the Orchestrator, which knows its model.
            "max_restarts": 0,
        }


def plan_placements(
    models: list[ModelConfig],
    cluster_gpus: float,
    workers_of: Callable[[ModelConfig], int] | None = None,
) -> dict[str, Placement | GpuUnavailable]:
    """Decide each enabled model's placement, in config order.

    GPUs are handed out to models in the order they are listed; a model that asks
    for GPUs (``device: gpu``) when too few are left falls back to CPU if its config
    allows, else gets a ``GpuUnavailable`` naming what it asked and what was there.
    ``device: auto`` takes GPUs when enough are left, CPUs otherwise.
    """
    count = workers_of or (lambda m: m.workers)
    free = int(cluster_gpus)
    plans: dict[str, Placement | GpuUnavailable] = {}
    for model in models:
        if not model.enabled:
            continue
        if model.device == "cpu":
            plans[model.name] = Placement(model.name, False, model.num_cpus)
            continue
        per_worker = gpus_per_worker(model)
        workers = count(model)
        if free >= workers * per_worker:
            free -= workers * per_worker
            plans[model.name] = Placement(model.name, True, model.num_cpus, gpus_per_worker=per_worker)
            continue
        if model.device == "auto":
            plans[model.name] = Placement(model.name, False, model.num_cpus)
        elif model.allow_cpu_fallback:
            plans[model.name] = Placement(model.name, False, model.num_cpus, fell_back_to_cpu=True)
        else:
            plans[model.name] = GpuUnavailable(
                f"model {model.name!r} asks for {workers} GPU worker(s) of {per_worker} GPU(s) "
                f"each (device: gpu) but "
                f"the Ray cluster has {free} free GPU(s) of {int(cluster_gpus)}; add GPUs, "
                f"lower `workers`, or set `allow_cpu_fallback: true`"
            )
    return plans
