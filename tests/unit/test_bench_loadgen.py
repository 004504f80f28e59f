"""The engine benchmark's bookkeeping: merging rounds, charging CPU to servers, comparing phases."""

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


def test_each_server_is_charged_its_own_processes_and_the_shared_ray_ones() -> None:
    from bench.engine import cpu_while

    before = {("haif", "Bridge"): 1.0, ("bare", "bare Serve replica (AsyncLLM)"): 2.0,
              ("ray", "Serve HTTP proxy"): 3.0, ("base", "API server (AsyncLLM)"): 4.0}
    after = {("haif", "Bridge"): 1.5, ("bare", "bare Serve replica (AsyncLLM)"): 2.25,
             ("ray", "Serve HTTP proxy"): 3.5, ("base", "API server (AsyncLLM)"): 5.0,
             ("haif", "Gateway"): 9.0}  # started between the readings: not charged
    assert cpu_while("haif", before, after) == {"Bridge": 0.5, "Serve HTTP proxy": 0.5}
    assert cpu_while("bare", before, after) == {"bare Serve replica (AsyncLLM)": 0.25, "Serve HTTP proxy": 0.5}
    assert cpu_while("base", before, after) == {"API server (AsyncLLM)": 1.0}


def test_haif_and_bare_serve_compare_as_shares_of_vllm_serve_in_their_own_phase() -> None:
    from bench.engine import BARE_NAME, bare_rows

    def level(tokens_per_s: float) -> LevelResult:
        return LevelResult(32, 1.0, [Sample(0.1, 1.0, int(tokens_per_s))])

    phase1 = {"haif": [level(800)], "base": [level(1000)]}
    phase2 = {"bare": [level(1800)], "base": [level(2000)]}  # a faster spell of the machine
    (tokens, _ttft, _e2e) = bare_rows(phase1, phase2)
    assert tokens.metric == "output tok/s c=32, x vllm serve" and tokens.baseline_name == BARE_NAME
    assert (tokens.haif, tokens.baseline) == (pytest.approx(0.8), pytest.approx(0.9))
    assert tokens.ratio == pytest.approx(0.8 / 0.9)
