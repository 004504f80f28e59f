"""The aggregator actor (one per HAIF app, named) and the pusher thread of each process.

The actor is off the request path: processes push to it from a background thread,
fire-and-forget, at most one push in flight each; only ``GET /metrics`` waits on it.
It is detached and restarted by Ray if it dies: live processes push their cumulative
snapshots again, so only the counts of processes that died meanwhile are lost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from haif.telemetry._aggregate import Aggregate

if TYPE_CHECKING:
    from collections.abc import Mapping

    from haif.telemetry._registry import Registry, Snapshot
    from haif.telemetry._target import MetricsTarget

logger = logging.getLogger("haif.telemetry")


class MetricsAggregator:
    """Ray actor: the latest snapshot of every HAIF process, merged on read."""

    def __init__(self, stale_after_s: float, retire_after_s: float, max_processes: int) -> None:
        self._aggregate = Aggregate(
            stale_after_s=stale_after_s, retire_after_s=retire_after_s, max_processes=max_processes
        )

    def push(self, process: str, component: str, snapshot: Snapshot) -> bool:
        return self._aggregate.push(process, component, snapshot, time.monotonic())

    def render(self) -> bytes:
        return self._aggregate.render(time.monotonic())

    def by_process(self, name: str, match: Mapping[str, str] | None = None) -> dict[str, float]:
        return self._aggregate.by_process(name, time.monotonic(), match)


def aggregator(target: MetricsTarget) -> Any:
    """The app's aggregator actor, created on first use (race-free: get_if_exists)."""
    import ray

    return (
        ray.remote(MetricsAggregator)
        .options(
            name=target.actor_name,
            namespace=target.namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
        )
        .remote(target.stale_after_s, target.retire_after_s, target.max_processes)
    )


class Pusher:
    """Pushes ``registry``'s snapshot to the aggregator every ``interval_s``, from a thread."""

    def __init__(self, registry: Registry, process: str, component: str, target: MetricsTarget) -> None:
        self._registry = registry
        self._process = process
        self._component = component
        self._target = target
        self._handle: Any = None
        self._pending: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"haif-metrics-{component}", daemon=True)
        self._failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._target.push_interval_s + 1)
        if flush:
            self.push_once()

    def _run(self) -> None:
        while not self._stop.wait(self._target.push_interval_s):
            try:
                self.push_once()
            except Exception:  # keep pushing: one bad beat must not end this process's metrics
                logger.exception("metrics push from %s failed", self._process)

    def push_once(self) -> None:
        """Send the current snapshot unless the previous push is still on its way."""
        import ray
        from ray.exceptions import RayError

        try:
            if self._pending is not None:
                done, _ = ray.wait([self._pending], timeout=0)
                if not done:
                    return  # the aggregator is slow: skip a beat rather than queue pushes
                pending, self._pending = self._pending, None
                ray.get(pending)
            if self._handle is None:
                self._handle = aggregator(self._target)
            snapshot = self._registry.snapshot()
            self._pending = self._handle.push.remote(self._process, self._component, snapshot)
            self._failures = 0
        except RayError as exc:
            # The aggregator died or is restarting: find it again on the next beat.
            self._handle, self._pending = None, None
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                logger.warning("metrics push from %s failed (%d in a row): %s",
                               self._process, self._failures, exc)
