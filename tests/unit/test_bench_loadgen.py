"""The engine benchmark's merging of rounds: a slow round does not decide the figure."""

from __future__ import annotations

import pytest

from bench.loadgen import LevelResult, Sample

pytestmark = pytest.mark.unit


def _round(tokens_per_s: float, ttft_s: float) -> LevelResult:
    return LevelResult(8, 1.0, [Sample(ttft_s, 2 * ttft_s, int(tokens_per_s))])


def test_rounds_merge_into_the_median_round_and_pooled_latencies() -> None:
    merged = LevelResult.merged([_round(900, 0.1), _round(280, 3.0), _round(850, 0.2)])
    assert merged.output_tokens_per_s == 850  # the median round, not the slow one's drag
    assert merged.rounds == [900, 280, 850]
    assert len(merged.samples) == 3 and merged.ttft_ms(100) == pytest.approx(3000)
    assert merged.wall_s == 3.0


def test_only_rounds_of_one_level_merge() -> None:
    with pytest.raises(ValueError):
        LevelResult.merged([_round(900, 0.1), LevelResult(32, 1.0, [])])
    with pytest.raises(ValueError):
        LevelResult.merged([])


def test_merged_rounds_add_up_the_cpu_of_each_process() -> None:
    one = LevelResult(8, 1.0, [], cpu_s={"Bridge": 0.25, "engine": 1.0})
    two = LevelResult(8, 2.0, [], cpu_s={"Bridge": 0.5})
    assert LevelResult.merged([one, two]).cpu_s == {"Bridge": 0.75, "engine": 1.0}
