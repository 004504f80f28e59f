"""Shared helpers of the benchmark suite: result rows, a printed table, JSON output.

Every figure is a ratio against a baseline measured in the same run (machines are
shared and noisy; absolute numbers drift). Each script writes its own
``bench/results/<bench>.json``; ``bench/run_all.py`` merges them into ``latest.json``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    bench: str
    metric: str
    haif: float
    baseline: float
    baseline_name: str
    higher_is_better: bool
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.haif / self.baseline if self.baseline else float("inf")

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["ratio"] = round(self.ratio, 4)
        return data


def percentile(values: list[float], pct: float) -> float:
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    header = f"{'metric':<34} {'haif':>12} {'baseline':>12} {'ratio':>8}  baseline / target"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.metric:<34} {r.haif:>12.3f} {r.baseline:>12.3f} {r.ratio:>8.3f}  "
            f"{r.baseline_name}{'  (' + r.target + ')' if r.target else ''}"
        )


def write_results(bench: str, rows: list[Row]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}.json"
    path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    return path
