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
    # The ratio's lowest and highest over the interleaved rounds of the run (its spread).
    spread: tuple[float, float] | None = None

    @property
    def ratio(self) -> float:
        return self.haif / self.baseline if self.baseline else float("inf")

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["ratio"] = round(self.ratio, 4)
        spread = data.pop("spread")
        if spread is not None:
            data["ratio_min"], data["ratio_max"] = round(spread[0], 4), round(spread[1], 4)
        return data


def round_ratios(haif: list[float], baseline: list[float]) -> tuple[float, float]:
    """The spread of a ratio: its lowest and highest over rounds (round i against round i)."""
    ratios = [h / b for h, b in zip(haif, baseline, strict=True) if b]
    return min(ratios), max(ratios)


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
    header = f"{'metric':<34} {'haif':>12} {'baseline':>12} {'ratio':>8} {'rounds':>13}  baseline / target"
    print(header)
    print("-" * len(header))
    for r in rows:
        spread = f"{r.spread[0]:.2f}-{r.spread[1]:.2f}" if r.spread else ""
        print(
            f"{r.metric:<34} {r.haif:>12.3f} {r.baseline:>12.3f} {r.ratio:>8.3f} {spread:>13}  "
            f"{r.baseline_name}{'  (' + r.target + ')' if r.target else ''}"
        )


def write_results(bench: str, rows: list[Row]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}.json"
    path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    return path
