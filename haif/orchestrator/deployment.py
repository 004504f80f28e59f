"""The Orchestrator: a Ray Serve deployment that owns the worker actors and routes to them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.worker import ModelWorker
from haif.exceptions import (
    DeadlineExceeded,
    HaifError,
    ModelNotFound,
    UnprocessableRequest,
    WorkerUnavailable,
    unwrap,
)
from haif.orchestrator.placement import Placement, plan_placements
from haif.orchestrator.pool import ModelPool, WorkerSlot
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.envelope import EmbeddingResult, WorkItem
    from haif.runtimes.base import GenerationOutput, StreamEvent

logger = logging.getLogger("haif.orchestrator")

_ACTOR_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class Orchestrator:
    """Creates each model's worker actors, tracks their state and routes requests.

    Workers are owned by this replica (not detached): if the replica dies, Ray tears
    its workers down with it and the replica Serve starts in its place creates new ones.
    """

    def __init__(self, config: HaifConfig) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        tracing.setup_tracing(config.telemetry, "orchestrator", region=config.regions[0].name, instance=replica)
        install_json_logs(config.telemetry, "orchestrator")
        self._config = config
        self._pools: dict[str, ModelPool] = {}
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        plans = plan_placements(config.models, cluster_gpus)
        remote_worker = ray.remote(ModelWorker)
        for model in config.models:
            if not model.enabled:
                continue
            plan = plans[model.name]
            if not isinstance(plan, Placement):
                logger.error("%s", plan.message)
                self._pools[model.name] = ModelPool(model, None, placement_error=plan)
                continue
            if plan.fell_back_to_cpu:
                logger.warning("model %s asked for a GPU; none free, running on CPU", model.name)
            pool = ModelPool(model, plan)
            for i in range(model.workers):
                worker_id = f"{model.name}/{replica}/{i}"
                options = plan.actor_options(model.max_concurrency)
                if plan.needs_placement_group:
                    options["scheduling_strategy"] = _tensor_parallel_strategy(plan)
                actor = remote_worker.options(**options).remote(
                    model,
                    config.limits.max_prompt_tokens,
                    str(config.base_path()),
                    worker_id,
                    config.artifacts,
                    config.telemetry,
                )
                load_ref = actor.load.remote(config.limits.object_ref_threshold_bytes)
                pool.slots.append(WorkerSlot(worker_id, actor, load_ref))
            self._pools[model.name] = pool

    # --- introspection ------------------------------------------------------------------

    def models(self) -> list[str]:
        return list(self._pools)

    def status(self) -> dict[str, Any]:
        models = {name: pool.status() for name, pool in self._pools.items()}
        ready = all(m["state"] == "ready" for m in models.values())
        return {"ready": ready, "models": models}

    async def workers_info(self, model: str | None = None) -> list[dict[str, Any]]:
        """Each live worker's own report (placement, GPU ids, load); dead ones are skipped."""
        slots = [s for name, p in self._pools.items() if model in (None, name) for s in p.slots]
        infos = await asyncio.gather(*(s.actor.info.remote() for s in slots), return_exceptions=True)
        return [i for i in infos if isinstance(i, dict)]

    # --- serving ----------------------------------------------------------------------

    def _pool(self, item: WorkItem, kind: str) -> ModelPool:
        pool = self._pools.get(item.model)
        if pool is None:
            raise ModelNotFound(f"the model {item.model!r} does not exist")
        if pool.model.kind != kind:
            use = "/v1/embeddings" if pool.model.kind == "embed" else "/v1/completions or /v1/chat/completions"
            raise UnprocessableRequest(f"model {item.model!r} does not support this endpoint; use {use}")
        return pool

    async def _call(self, pool: ModelPool, item: WorkItem, method: str) -> Any:
        with tracing.span("orchestrator.route", item.ctx, attributes={tracing.MODEL: item.model}) as span:
            slot = pool.pick()
            span.set_attribute(tracing.WORKER, slot.worker_id)
            slot.in_flight += 1
            ref = getattr(slot.actor, method).remote(tracing.handoff(item))
            try:
                return await asyncio.wait_for(_resolve(ref), timeout=item.ctx.remaining_s())
            except TimeoutError:
                ray.cancel(ref)
                raise DeadlineExceeded(
                    f"request {item.ctx.request_id} exceeded its deadline on model {item.model!r}"
                ) from None
            except _ACTOR_GONE as exc:
                pool.mark_dead(slot, f"{type(exc).__name__}")
                raise WorkerUnavailable(f"the worker serving {item.model!r} died; retry") from None
            except Exception as exc:  # a Ray task error: re-raise the HAIF error it carries
                raise _typed(exc) from None
            finally:
                slot.in_flight -= 1

    async def generate(self, item: WorkItem) -> list[GenerationOutput]:
        return await self._call(self._pool(item, "generate"), item, "generate")

    async def embed(self, item: WorkItem) -> EmbeddingResult:
        return await self._call(self._pool(item, "embed"), item, "embed")

    async def stream(self, item: WorkItem) -> AsyncIterator[StreamEvent]:
        pool = self._pool(item, "generate")
        with tracing.span("orchestrator.route", item.ctx, attributes={tracing.MODEL: item.model}) as span:
            slot = pool.pick()
            span.set_attribute(tracing.WORKER, slot.worker_id)
            slot.in_flight += 1
            gen = slot.actor.generate_stream.options(num_returns="streaming").remote(tracing.handoff(item))
            finished = False
            try:
                while True:
                    try:
                        ref = await asyncio.wait_for(gen.__anext__(), timeout=item.ctx.remaining_s())
                        event = await ref
                    except StopAsyncIteration:
                        finished = True
                        return
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"request {item.ctx.request_id} exceeded its deadline on model {item.model!r}"
                        ) from None
                    except _ACTOR_GONE as exc:
                        pool.mark_dead(slot, type(exc).__name__)
                        raise WorkerUnavailable(
                            f"the worker streaming {item.model!r} died mid-stream"
                        ) from None
                    except HaifError:
                        raise
                    except Exception as exc:
                        raise _typed(exc) from None
                    yield event
            finally:
                slot.in_flight -= 1
                if not finished:
                    # Client gone, deadline passed or error: stop the generation on the worker.
                    ray.cancel(gen)


def _tensor_parallel_strategy(plan: Placement) -> Any:
    """A placement group with one GPU bundle per tensor-parallel rank, packed on one node.

    Child tasks are captured, so the engine's Ray workers land in its bundles.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group(plan.placement_group_bundles(), strategy="STRICT_PACK")
    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)


async def _resolve(ref: Any) -> Any:
    return await ref


def _typed(exc: BaseException) -> BaseException:
    err = unwrap(exc)
    if isinstance(err, HaifError):
        return err
    logger.error("unexpected worker failure: %r", exc)
    return WorkerUnavailable(f"worker failed: {type(err).__name__}")
