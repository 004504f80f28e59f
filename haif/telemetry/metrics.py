"""Platform metrics, aggregated across every replica and actor, served at ``GET /metrics``.

How it works: every serving process (Bridge, Gateway and Orchestrator replicas, worker
actors) records into its own ``Registry`` (counters, gauges, fixed-bucket histograms)
and a background thread pushes the cumulative snapshot every
``telemetry.metrics_push_interval_s`` to one named, detached Ray actor per app
(``<app_name>-metrics`` in the ``ray.namespace``). The actor sums counters and
histograms over every process it has seen (totals never go backwards when a replica
dies) and merges gauges over live processes only; the Bridge asks it for the
Prometheus text on each scrape. Names, labels and buckets are in ``_catalog.py``.

What each component calls:

* Bridge: ``BridgeMetrics`` (requests by endpoint/model/status, latency, TTFT, ITL).
* Gateway: ``haif.gateway.metrics.GatewayMetrics`` (admission outcomes, quota
  rejections, requests by model/status, tokens in/out).
* Orchestrator: ``OrchestratorMetrics.watch_workers`` (workers by state, in flight),
  ``queue_depth(model, n)``, ``circuit_state(model, worker, "closed"|"half_open"|"open")``,
  ``forget_worker(model, worker)``, ``dlq_depth(n)``.
* Worker actors: ``WorkerMetrics`` (in flight, artifact cache hits/misses, LoRA adapter
  loads, evictions and hits).

Label values are bounded: model names outside the config become ``other`` (``BASE:ADAPTER``
becomes ``BASE``), statuses
are error codes of ``haif.exceptions``, tenants are names from the metadata store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from haif.exceptions import HaifError, MetricsUnavailable
from haif.telemetry._catalog import CATALOG, CIRCUIT_STATES, WORKER_STATES, exported_names
from haif.telemetry._registry import Labels, Registry
from haif.telemetry._target import MetricsTarget

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from haif.telemetry._actor import Pusher

__all__ = [
    "CATALOG",
    "CONTENT_TYPE",
    "OTHER",
    "BridgeMetrics",
    "MetricsReader",
    "MetricsTarget",
    "OrchestratorMetrics",
    "ProcessMetrics",
    "WorkerMetrics",
    "exported_names",
    "status_of",
]

logger = logging.getLogger("haif.telemetry")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"  # the label value of any model name the config does not define


class ProcessMetrics:
    """One process's registry and, inside a Ray cluster, the thread that pushes it."""

    def __init__(self, component: str, registry: Registry | None = None) -> None:
        self.component = component
        self.registry = registry or Registry()
        self.process_id = f"{component}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pusher: Pusher | None = None

    @classmethod
    def start(cls, target: MetricsTarget | None, component: str) -> ProcessMetrics:
        """A registry for ``component``, pushed to the aggregator when Ray is running here."""
        metrics = cls(component)
        if target is not None and target.enabled:
            import ray

            if ray.is_initialized():
                from haif.telemetry._actor import Pusher

                metrics._pusher = Pusher(metrics.registry, metrics.process_id, component, target)
                metrics._pusher.start()
        return metrics

    @property
    def pushing(self) -> bool:
        return self._pusher is not None

    def stop(self) -> None:
        """Stop pushing, after one last push of what was recorded."""
        if self._pusher is not None:
            self._pusher.stop(flush=True)
            self._pusher = None


def model_label(name: str | None, known: frozenset[str]) -> str:
    """``name`` when the config defines it, the base of a ``BASE:ADAPTER`` name (LoRA
    adapters are counted with their base), ``other`` for any other string, "" for none."""
    if not name:
        return ""
    if name in known:
        return name
    cut = name.rfind(":")
    while cut > 0:  # a model name may hold ":" itself
        if name[:cut] in known:
            return name[:cut]
        cut = name.rfind(":", 0, cut)
    return OTHER


def status_of(exc: BaseException | None) -> str:
    """A request's status label: ok, a HAIF error code, cancelled, or error."""
    if exc is None:
        return "ok"
    if isinstance(exc, HaifError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return "error"


class BridgeMetrics:
    """What the HTTP Bridge records."""

    def __init__(self, metrics: ProcessMetrics, models: Iterable[str]) -> None:
        self.registry = metrics.registry
        self._known = frozenset(models)

    def model(self, name: str | None) -> str:
        return model_label(name, self._known)

    def http(self, endpoint: str, model: str | None, status: int, duration_s: float) -> None:
        label = self.model(model)
        self.registry.inc("haif_http_requests_total", (endpoint, label, str(status)))
        self.registry.observe("haif_http_request_duration_seconds", (endpoint, label), duration_s)

    def first_token(self, model: str, seconds: float) -> None:
        self.registry.observe("haif_time_to_first_token_seconds", (self.model(model),), seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        self.registry.observe("haif_inter_token_latency_seconds", (self.model(model),), seconds)


# (model, version, state, in_flight) of one worker; state is one of WORKER_STATES
WorkerSample = tuple[str, str, str, int]


class OrchestratorMetrics:
    """What the Orchestrator records; the functions to call for queues, breakers, the DLQ."""

    def __init__(self, metrics: ProcessMetrics) -> None:
        self.registry = metrics.registry

    def watch_workers(self, sample: Callable[[], Iterable[WorkerSample]]) -> None:
        """Sample ``haif_workers{model,version,state}`` and ``haif_in_flight_requests{model}``
        before each push. ``sample`` runs on the pusher thread: it must only read (copy
        containers with ``list()`` before iterating them)."""

        def collect(registry: Registry) -> None:
            workers: dict[Labels, float] = {}
            in_flight: dict[Labels, float] = {}
            versions: set[tuple[str, str]] = set()
            for model, version, state, busy in list(sample()):
                versions.add((model, version))
                workers[(model, version, state)] = workers.get((model, version, state), 0) + 1
                in_flight[(model,)] = in_flight.get((model,), 0) + busy
            for model, version in versions:  # zeros: a panel shows "0 ready", not "no data"
                for state in WORKER_STATES:
                    workers.setdefault((model, version, state), 0)
            registry.replace("haif_workers", workers)
            registry.replace("haif_in_flight_requests", in_flight)

        self.registry.add_collector(collect)

    def watch_rollouts(self, sample: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Sample ``haif_rollout_weight{model,version}`` (percent) before each push."""

        def collect(registry: Registry) -> None:
            registry.replace("haif_rollout_weight", {(m, v): w for m, v, w in list(sample())})

        self.registry.add_collector(collect)

    def autoscaled(self, model: str, direction: str) -> None:
        self.registry.inc("haif_autoscale_decisions_total", (model, direction))

    def rolled_back(self, model: str, version: str) -> None:
        self.registry.inc("haif_rollout_auto_rollbacks_total", (model, version))

    def queue_depth(self, model: str, depth: int) -> None:
        """Requests of ``model`` waiting in this replica's queue (summed over replicas)."""
        self.registry.set("haif_queue_depth", (model,), depth)

    def circuit_state(self, model: str, worker: str, state: str | int) -> None:
        """This replica's breaker for ``worker``: "closed", "half_open", "open" (or 0/1/2)."""
        value = CIRCUIT_STATES.get(state) if isinstance(state, str) else state
        if value not in CIRCUIT_STATES.values():
            raise ValueError(f"circuit state {state!r} is not one of {sorted(CIRCUIT_STATES)}")
        self.registry.set("haif_circuit_state", (model, worker), value)

    def forget_worker(self, model: str, worker: str) -> None:
        """Drop the breaker series of a worker that is gone."""
        self.registry.remove("haif_circuit_state", (model, worker))

    def dlq_depth(self, depth: int) -> None:
        """Entries in the dead-letter queue, as this process last counted them (max merged)."""
        self.registry.set("haif_dlq_depth", (), depth)


class WorkerMetrics:
    """What a worker actor records."""

    def __init__(self, metrics: ProcessMetrics, model: str) -> None:
        self.registry = metrics.registry
        self._model = model

    def watch_in_flight(self, in_flight: Callable[[], int]) -> None:
        model = (self._model,)
        self.registry.add_collector(
            lambda r: r.set("haif_worker_in_flight_requests", model, in_flight())
        )

    def artifact_pulled(self, hits: int, misses: int) -> None:
        """Blobs of one pull found in the node cache / fetched from a replica."""
        self.registry.inc("haif_artifact_cache_hits_total", (self._model,), hits)
        self.registry.inc("haif_artifact_cache_misses_total", (self._model,), misses)

    def adapter_loaded(self) -> None:
        self.registry.inc("haif_adapter_loads_total", (self._model,))

    def adapter_evicted(self) -> None:
        self.registry.inc("haif_adapter_evictions_total", (self._model,))

    def adapter_hit(self) -> None:
        self.registry.inc("haif_adapter_cache_hits_total", (self._model,))


class MetricsReader:
    """The Bridge's side of ``GET /metrics``: the aggregator's text, or MetricsUnavailable."""

    def __init__(self, target: MetricsTarget) -> None:
        self._target = target
        self._handle: Any = None

    async def render(self) -> bytes:
        """Raises: MetricsUnavailable (disabled, or no answer within scrape_timeout_s)."""
        if not self._target.enabled:
            raise MetricsUnavailable("metrics are disabled (telemetry.metrics_enabled: false)")
        import ray

        if not ray.is_initialized():
            raise MetricsUnavailable("metrics need a Ray cluster; none is connected")
        from ray.exceptions import RayError

        from haif.telemetry._actor import aggregator

        timeout = self._target.scrape_timeout_s
        try:
            if self._handle is None:
                # Creating/looking up the named actor talks to the GCS: not on the loop.
                self._handle = await asyncio.wait_for(
                    asyncio.to_thread(aggregator, self._target), timeout
                )
            return await asyncio.wait_for(_resolve(self._handle.render.remote()), timeout)
        except TimeoutError:
            raise MetricsUnavailable(
                f"the metrics aggregator did not answer within {timeout:g} s"
            ) from None
        except RayError as exc:
            self._handle = None  # look it up again next time (it may be restarting)
            raise MetricsUnavailable(
                f"the metrics aggregator is unavailable: {type(exc).__name__}"
            ) from None


async def _resolve(ref: Any) -> Any:
    return await ref
