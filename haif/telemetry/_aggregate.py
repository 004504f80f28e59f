"""Merging the snapshots of every process into one view, and rendering it for Prometheus.

Each process pushes its cumulative snapshot; the aggregate keeps the latest one per
process. Counters and histograms are summed over every process ever seen, so a
process that died leaves its counts behind and totals never go backwards. Gauges are
merged (sum or max, per the catalog) over fresh processes only: a dead process's
in-flight count must not linger. A process silent for ``retire_after_s`` (or the
longest-silent one, past ``max_processes``) is folded into a running total and
forgotten; a late push from it is ignored rather than counted twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from haif.telemetry._catalog import SPECS, MetricSpec
from haif.telemetry._registry import HistogramValue, Labels, Snapshot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger("haif.telemetry")

RETIRED_IDS_KEPT = 100_000
AGGREGATOR_COMPONENT = "aggregator"


@dataclass
class _Process:
    component: str
    snapshot: Snapshot
    seen: float  # the aggregator's clock (time.monotonic) at the last push


class Aggregate:
    """The latest snapshot of every process and the totals of retired ones."""

    def __init__(
        self,
        *,
        stale_after_s: float,
        retire_after_s: float,
        max_processes: int,
        specs: Mapping[str, MetricSpec] = SPECS,
    ) -> None:
        self._specs = specs
        self._stale_after_s = stale_after_s
        self._retire_after_s = retire_after_s
        self._max_processes = max_processes
        self._processes: dict[str, _Process] = {}
        self._retired: Snapshot = {}
        self._retired_ids: OrderedDict[str, None] = OrderedDict()
        self._unknown: set[str] = set()

    def push(self, process: str, component: str, snapshot: Snapshot, now: float) -> bool:
        """Keep ``snapshot`` as ``process``'s latest; False when the process was retired."""
        if process in self._retired_ids:
            return False
        self._processes[process] = _Process(component, self._known(snapshot), now)
        self._retire(now)
        return True

    def _known(self, snapshot: Snapshot) -> Snapshot:
        # A process of another HAIF version may send names or buckets this one lacks.
        out: Snapshot = {}
        for name, series in snapshot.items():
            spec = self._specs.get(name)
            if spec is None or spec.kind == "histogram" and any(
                not isinstance(v, HistogramValue) or len(v.counts) != len(spec.buckets) + 1
                for v in series.values()
            ):
                if name not in self._unknown:
                    self._unknown.add(name)
                    logger.warning("metric %r does not match this aggregator's catalog; dropped", name)
                continue
            out[name] = series
        return out

    def _retire(self, now: float) -> None:
        expired = [p for p, s in self._processes.items() if now - s.seen > self._retire_after_s]
        excess = len(self._processes) - len(expired) - self._max_processes
        if excess > 0:
            alive = sorted((s.seen, p) for p, s in self._processes.items() if p not in expired)
            expired += [p for _, p in alive[:excess]]
        for process in expired:
            state = self._processes.pop(process)
            for name, series in state.snapshot.items():
                if self._specs[name].kind != "gauge":
                    _add_into(self._retired.setdefault(name, {}), series)
            self._retired_ids[process] = None
            if len(self._retired_ids) > RETIRED_IDS_KEPT:
                self._retired_ids.popitem(last=False)

    # --- reading ----------------------------------------------------------------------

    def fresh(self, now: float) -> list[_Process]:
        return [s for s in self._processes.values() if now - s.seen <= self._stale_after_s]

    def merged(self, now: float) -> Snapshot:
        """Every metric of the catalog merged across processes (plus the pipeline's own)."""
        out: Snapshot = {name: dict(series) for name, series in self._retired.items()}
        fresh = self.fresh(now)
        for state in self._processes.values():
            for name, series in state.snapshot.items():
                if self._specs[name].kind != "gauge":
                    _add_into(out.setdefault(name, {}), series)
        for state in fresh:
            for name, series in state.snapshot.items():
                spec = self._specs[name]
                if spec.kind == "gauge":
                    target = out.setdefault(name, {})
                    for labels, value in series.items():
                        old = target.get(labels)
                        if old is None:
                            target[labels] = value
                        elif spec.merge == "max":
                            target[labels] = max(old, value)  # type: ignore[type-var]
                        else:
                            target[labels] = old + value  # type: ignore[operator]
        processes: dict[Labels, float] = {}
        for state in fresh:
            processes[(state.component,)] = processes.get((state.component,), 0.0) + 1
        if "haif_metrics_processes" in self._specs:
            out["haif_metrics_processes"] = processes
        return out

    def by_process(self, name: str, now: float, match: Mapping[str, str] | None = None) -> dict[str, float]:
        """Each live process's contribution to ``name`` (series filtered by ``match``).

        Histograms contribute their count. Shows that the totals come from several
        processes (tests, debugging).
        """
        spec = self._specs[name]
        out: dict[str, float] = {}
        for process, state in self._processes.items():
            total = 0.0
            for labels, value in state.snapshot.get(name, {}).items():
                if match and any(dict(zip(spec.labels, labels, strict=True)).get(k) != v
                                 for k, v in match.items()):
                    continue
                total += value.count if isinstance(value, HistogramValue) else value
            out[process] = total
        return out

    def render(self, now: float) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of ``merged(now)``."""
        from prometheus_client.exposition import generate_latest  # lazy: only the actor renders

        return generate_latest(_Families(self._specs, self.merged(now)))  # type: ignore[arg-type]


def _add_into(target: dict[Labels, Any], series: Mapping[Labels, Any]) -> None:
    for labels, value in series.items():
        old = target.get(labels)
        if old is None:
            target[labels] = value
        elif isinstance(value, HistogramValue):
            target[labels] = HistogramValue(
                tuple(a + b for a, b in zip(old.counts, value.counts, strict=True)), old.sum + value.sum
            )
        else:
            target[labels] = old + value


class _Families:
    """A prometheus_client collector over a merged snapshot (it writes HELP/TYPE, escapes)."""

    def __init__(self, specs: Mapping[str, MetricSpec], merged: Snapshot) -> None:
        self._specs = specs
        self._merged = merged

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        for name, spec in self._specs.items():
            series = self._merged.get(name, {})
            labels = list(spec.labels)
            if spec.kind == "counter":
                family: Metric = CounterMetricFamily(name, spec.help, labels=labels)
                for key, value in sorted(series.items()):
                    family.add_metric(list(key), value)
            elif spec.kind == "gauge":
                family = GaugeMetricFamily(name, spec.help, labels=labels)
                for key, value in sorted(series.items()):
                    family.add_metric(list(key), value)
            else:
                family = HistogramMetricFamily(name, spec.help, labels=labels)
                bounds = [floatToGoString(b) for b in spec.buckets] + ["+Inf"]
                for key, value in sorted(series.items()):
                    cumulative, running = [], 0
                    for bound, count in zip(bounds, value.counts, strict=True):
                        running += count
                        cumulative.append((bound, running))
                    family.add_metric(list(key), cumulative, value.sum)
            yield family
