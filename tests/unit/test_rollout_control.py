"""The control plane's rollout and autoscaling policy, and how a Gateway routes by
version, without Ray: the operator's intent, the traffic split, the canary's judge, the
autoscaler, sticky version picks, version failover, draining workers, scale to zero."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from haif.config import AutoscalingConfig, ModelConfig, ResilienceConfig, RolloutsConfig
from haif.envelope import RequestContext
from haif.exceptions import ModelNotReady, UnprocessableRequest
from haif.orchestrator.autoscale import PoolScaler
from haif.orchestrator.backends import ModelRouter, Route, new_breaker
from haif.orchestrator.rollout import CanaryJudge, Intent, weights
from haif.orchestrator.table import SHARED_TIER, ModelRoutes, WorkerRoute
from haif.store.rollouts import Rollout

pytestmark = pytest.mark.unit

ECHO = ModelConfig(name="m", runtime="echo")


def _row(**kw: object) -> Rollout:
    base = dict(
        model="m", base_version="1", stable_version="1", canary_version="2", canary_weight=30,
        canary_status=None, reason=None, auto_rollbacks=0, generation=4, updated_at=datetime.now(UTC),
    )
    return Rollout(**{**base, **kw})  # type: ignore[arg-type]


# --- the operator's intent and the traffic split -------------------------------------------


def test_intent_is_the_row_unless_the_config_moved_on() -> None:
    assert Intent.of(ECHO, None) == Intent(stable="1")
    assert Intent.of(ECHO, _row()) == Intent(stable="1", canary="2", weight=30, generation=4)
    # A redeploy with version 5 in the config supersedes a rollout begun on version 1.
    assert Intent.of(ECHO.model_copy(update={"version": "5"}), _row()) == Intent(stable="5")
    assert Intent.of(ECHO, _row(canary_version=None, canary_weight=0)).versions == ("1",)


def test_a_canary_gets_its_weight_only_once_ready() -> None:
    intent = Intent(stable="1", canary="2", weight=30)
    assert weights(intent, canary_ready=False) == (("1", 100),)
    assert weights(intent, canary_ready=True) == (("1", 70), ("2", 30))
    assert weights(Intent(stable="1", canary="2", weight=100), True) == (("2", 100),)
    assert weights(Intent(stable="1", canary="2", weight=0), True) == (("1", 100),)


def test_versions_are_artifacts_of_the_same_name() -> None:
    llama = ModelConfig(name="llama", runtime="torch", artifact="llama:1")
    assert llama.at_version("2").artifact == "llama:2" and llama.at_version("2").version == "2"
    assert llama.at_version("1") is llama
    with pytest.raises(UnprocessableRequest, match="rollout needs a published artifact"):
        ModelConfig(name="p", runtime="torch", path="/m").at_version("2")


def test_the_judge_rolls_back_above_the_rate_over_enough_requests_in_the_window() -> None:
    now = [0.0]
    judge = CanaryJudge(RolloutsConfig(max_error_rate=0.2, min_requests=10, window_s=30), clock=lambda: now[0])
    judge.add("m", "2", 5, 5)
    assert judge.verdict("m", "2") is None, "too few requests to judge"
    judge.add("m", "2", 10, 0)
    assert judge.verdict("m", "2") is not None, "5 of 15 failed: 33 % > 20 %"
    now[0] = 31.0  # the failures leave the window
    judge.add("m", "2", 10, 3)
    assert judge.rate("m", "2") == (10, 3)
    verdict = judge.verdict("m", "2")
    assert verdict is not None and "3 of its last 10" in verdict and "20%" in verdict
    assert CanaryJudge(RolloutsConfig()).verdict("m", "2") is None, "no max_error_rate: never"


# --- the autoscaler --------------------------------------------------------------------------


def test_autoscaler_waits_its_delays_and_stays_within_bounds() -> None:
    scaler = PoolScaler(AutoscalingConfig(min_workers=1, max_workers=3, target_ongoing_requests=2,
                                          upscale_delay_s=5, downscale_delay_s=10))
    assert scaler.decide(0, 1, 9) == 1  # wants 3 (capped), not for 5 s yet
    assert scaler.decide(4.9, 1, 9) == 1
    assert scaler.decide(5.0, 1, 9) == 3
    assert scaler.last is not None and scaler.last.describe().startswith("up 1→3")
    assert scaler.decide(6, 3, 0) == 3  # idle: not for 10 s
    assert scaler.decide(10, 3, 5) == 3  # a burst resets the downscale clock
    assert scaler.decide(11, 3, 0) == 3
    assert scaler.decide(20.9, 3, 0) == 3
    assert scaler.decide(21, 3, 0) == 1  # the floor, never below
    assert scaler.last.direction == "down"


def test_a_pool_whose_workers_are_starting_is_not_scaled_down() -> None:
    scaler = PoolScaler(AutoscalingConfig(min_workers=0, max_workers=2, downscale_delay_s=1))
    assert scaler.decide(0, 1, 0, starting=True) == 1
    assert scaler.decide(5, 1, 0, starting=True) == 1, "its worker is loading: what it is for may be waiting"
    assert scaler.decide(6, 1, 0) == 1, "the delay starts once it is up"
    assert scaler.decide(7, 1, 0) == 0


async def test_the_queue_counts_every_waiting_request_even_just_after_a_table_update() -> None:
    router = _router([("w", "1", "loading")], weights=(("1", 100),), stable="1", ever_ready=True,
                     replacing=True)

    async def run() -> list[int]:
        waiting = [asyncio.create_task(router.acquire(ROUTE, _ctx(), frozenset(), None, "1")) for _ in range(3)]
        await asyncio.sleep(0.01)
        seen = [router.queued]
        router.update(router.routes)  # wakes every waiter: none is in the deque until it looks again
        seen.append(router.queued)
        await asyncio.sleep(0.01)
        seen.append(router.queued)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        seen.append(router.queued)
        return seen

    assert await run() == [3, 3, 3, 0]


def test_scale_to_zero_and_back_at_once() -> None:
    scaler = PoolScaler(AutoscalingConfig(min_workers=0, max_workers=2, target_ongoing_requests=1,
                                          upscale_delay_s=30, downscale_delay_s=3))
    assert scaler.decide(0, 1, 0) == 1
    assert scaler.decide(3, 1, 0) == 0
    assert scaler.decide(4, 0, 1) == 1, "a waiting request gets a worker without upscale_delay_s"
    assert scaler.decide(5, 0, 0) == 0


# --- routing by version in a Gateway ----------------------------------------------------------


def _router(workers: list[tuple[str, str, str]], **facts: object) -> ModelRouter:
    routes = ModelRoutes(
        name="m", kind="generate",
        workers=tuple(WorkerRoute(w, None, "a", SHARED_TIER, state, 4, version=v) for w, v, state in workers),
        **facts,
    )
    router = ModelRouter(routes, max_queued=4, overloaded_retry_after_s=1,
                         new_breaker=lambda: new_breaker(ResilienceConfig()), rng=random.Random(3))
    router.update(routes)
    return router


def _ctx(timeout_s: float = 5.0) -> RequestContext:
    return RequestContext.new(timeout_s=timeout_s, api_key=None)


ROUTE = Route(SHARED_TIER, ("a",))


def test_weights_split_traffic_and_keys_stick() -> None:
    routes = ModelRoutes(name="m", kind="generate", weights=(("1", 70), ("2", 30)), stable="1")
    rng = random.Random(7)
    picks = Counter(routes.version_for(None, rng.random()) for _ in range(10_000))
    assert 0.28 < picks["2"] / 10_000 < 0.32, picks
    assert len({routes.version_for("user-42", rng.random()) for _ in range(50)}) == 1
    by_key = Counter(routes.version_for(f"key-{i}", 0.0) for i in range(2000))
    assert 0.25 < by_key["2"] / 2000 < 0.35, by_key
    assert ModelRoutes(name="m", kind="generate", stable="4").version_for(None, 0.9) == "4"


async def test_a_request_goes_to_its_version_and_fails_over_when_it_has_no_live_worker() -> None:
    router = _router([("v1a", "1", "ready"), ("v2a", "2", "ready")], weights=(("1", 50), ("2", 50)), stable="1")

    async def pick(version: str) -> str:
        backend = await router.acquire(ROUTE, _ctx(), frozenset(), None, version)
        router.release(backend)
        return backend.worker_id

    assert {await pick("2") for _ in range(10)} == {"v2a"}
    assert {await pick("1") for _ in range(10)} == {"v1a"}
    router.saw_draining(router.backends["v2a"])  # it refused one as draining: none of it live
    assert await pick("2") == "v1a"


async def test_draining_workers_get_no_new_request() -> None:
    router = _router([("old", "1", "draining"), ("new", "2", "ready")], weights=(("2", 100),), stable="2")
    for version in ("1", "2", None):
        backend = await router.acquire(ROUTE, _ctx(), frozenset(), None, version)
        assert backend.worker_id == "new"
        router.release(backend)


async def test_a_model_scaled_to_zero_holds_requests_and_asks_for_a_worker() -> None:
    asked: list[str] = []
    router = _router([], scaled_to_zero=True)
    router.demand = asked.append

    async def run() -> str:
        waiting = asyncio.create_task(router.acquire(ROUTE, _ctx(), frozenset(), None, "1"))
        await asyncio.sleep(0.05)
        assert not waiting.done() and asked == ["m"], "it waits, and the Orchestrator is asked"
        router.update(ModelRoutes(
            name="m", kind="generate", workers=(WorkerRoute("w", None, "a", SHARED_TIER, "ready", 4),),
            weights=(("1", 100),),
        ))
        return (await waiting).worker_id

    assert await run() == "w"
    # Not scaled to zero, no worker: a typed error at once, not a wait.
    with pytest.raises(ModelNotReady):
        await _router([]).acquire(ROUTE, _ctx(), frozenset(), None, "1")


def test_a_model_has_a_fixed_fleet_or_an_autoscaler_not_both() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not both"):
        ModelConfig(name="m", runtime="echo", workers=2, autoscaling={"min_workers": 1, "max_workers": 3})
    with pytest.raises(ValidationError, match="exceeds max_workers"):
        ModelConfig(name="m", runtime="echo", autoscaling={"min_workers": 4, "max_workers": 3})
    elastic = ModelConfig(name="m", runtime="echo", autoscaling={"min_workers": 0, "max_workers": 3})
    assert (elastic.initial_workers, elastic.max_workers) == (0, 3)
