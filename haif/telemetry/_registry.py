"""One process's metrics: counters, gauges and fixed-bucket histograms, keyed by label values.

Recording is a dict update under an uncontended lock (the pusher thread takes a
snapshot under the same lock), so the hot path pays well under a microsecond.
A snapshot holds cumulative values: sending it twice, or losing one, changes nothing.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from haif.telemetry._catalog import SPECS, MetricSpec

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger("haif.telemetry")

Labels = tuple[str, ...]


@dataclass(frozen=True)
class HistogramValue:
    """Per-bucket (not cumulative) counts, the +Inf bucket last; their sum; the count."""

    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


# name -> labels -> float (counters, gauges) or HistogramValue
Snapshot = dict[str, dict[Labels, "float | HistogramValue"]]
Collector = Callable[["Registry"], None]


class Registry:
    """The metrics of one process, restricted to the catalog's names and label sets."""

    def __init__(self, specs: Mapping[str, MetricSpec] = SPECS) -> None:
        self._specs = specs
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        self._hist: dict[str, dict[Labels, tuple[list[int], list[float]]]] = {}
        self._collectors: list[Collector] = []

    def _spec(self, name: str, kind: str, labels: Labels) -> MetricSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"unknown metric {name!r} (add it to haif/telemetry/_catalog.py)")
        if spec.kind != kind:
            raise ValueError(f"metric {name!r} is a {spec.kind}, not a {kind}")
        if len(labels) != len(spec.labels):
            raise ValueError(f"metric {name!r} takes labels {spec.labels}, got {labels!r}")
        return spec

    # --- recording --------------------------------------------------------------------

    def inc(self, name: str, labels: Labels = (), value: float = 1.0) -> None:
        """Add ``value`` (≥ 0) to a counter."""
        self._spec(name, "counter", labels)
        if value < 0:
            raise ValueError(f"counter {name!r} cannot decrease (got {value})")
        with self._lock:
            series = self._values.setdefault(name, {})
            series[labels] = series.get(labels, 0.0) + value

    def set(self, name: str, labels: Labels, value: float) -> None:
        """Set a gauge."""
        self._spec(name, "gauge", labels)
        with self._lock:
            self._values.setdefault(name, {})[labels] = float(value)

    def remove(self, name: str, labels: Labels) -> None:
        """Forget one series of a gauge (a worker that is gone)."""
        self._spec(name, "gauge", labels)
        with self._lock:
            self._values.get(name, {}).pop(labels, None)

    def replace(self, name: str, values: Mapping[Labels, float]) -> None:
        """Make ``values`` the whole content of a gauge (series not named disappear)."""
        for labels in values:
            self._spec(name, "gauge", labels)
        with self._lock:
            self._values[name] = {k: float(v) for k, v in values.items()}

    def observe(self, name: str, labels: Labels, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value`` in a histogram."""
        spec = self._spec(name, "histogram", labels)
        index = bisect.bisect_left(spec.buckets, value)  # le: a value on a bound counts in it
        with self._lock:
            series = self._hist.setdefault(name, {})
            entry = series.get(labels)
            if entry is None:
                entry = series[labels] = ([0] * (len(spec.buckets) + 1), [0.0])
            entry[0][index] += count
            entry[1][0] += value * count

    def add_collector(self, collector: Collector) -> None:
        """Call ``collector(registry)`` before each snapshot, to sample gauges.

        It runs on the pusher's thread: it must only read the state it samples.
        """
        self._collectors.append(collector)

    # --- reading ------------------------------------------------------------------------

    def _collect(self) -> None:
        for collector in list(self._collectors):
            try:
                collector(self)
            except Exception:  # a broken sampler must not stop the counters from flowing
                logger.warning("metrics collector %r failed; its gauges keep their last values",
                               collector, exc_info=True)

    def snapshot(self) -> Snapshot:
        """Cumulative values of every series (plain data: it crosses Ray by pickling)."""
        self._collect()
        out: Snapshot = {}
        with self._lock:
            for name, series in self._values.items():
                out[name] = dict(series)
            for name, hseries in self._hist.items():
                out[name] = {
                    labels: HistogramValue(tuple(counts), total[0])
                    for labels, (counts, total) in hseries.items()
                }
        return out

    def value(self, name: str, labels: Labels = ()) -> float | HistogramValue | None:
        """One series' current value in this process (tests, introspection)."""
        return self.snapshot().get(name, {}).get(labels)

    def names(self) -> Iterable[str]:
        return self._specs.keys()
