"""Circuit breaker, backoff, the Gateway's router (power of two choices, regions, tiers,
bounded queue, what is retried), the fleet's replacement backoff and the client deadline
header: the routing policy without Ray."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from haif.config import HaifConfig, ModelConfig, ResilienceConfig
from haif.envelope import RequestContext, timeout_from
from haif.exceptions import (
    DeadlineExceeded,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotReady,
    Overloaded,
    WorkerUnavailable,
)
from haif.orchestrator.backends import ModelRouter, Route, new_breaker
from haif.orchestrator.breaker import Backoff, BreakerState, CircuitBreaker
from haif.orchestrator.fleet import Slot
from haif.orchestrator.router import Router
from haif.orchestrator.table import SHARED_TIER, ModelRoutes, RoutingTable, WorkerRoute


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_recovers_through_half_open() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, open_s=5, half_open_calls=1, clock=clock)
    b.failure()
    b.failure()
    assert b.state is BreakerState.CLOSED and b.allows()
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allows()
    clock.now += 4.9
    assert not b.allows()
    clock.now += 0.2
    assert b.state is BreakerState.HALF_OPEN and b.allows()
    b.before_call()  # the one trial call
    assert not b.allows(), "a half-open breaker lets through only its trial calls"
    b.success()
    assert b.state is BreakerState.CLOSED and b.allows()
    assert b.opened_count == 1


def test_breaker_failed_trial_reopens() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, open_s=1, clock=clock)
    b.trip()
    clock.now += 1.5
    b.before_call()
    b.failure()
    assert b.state is BreakerState.OPEN
    clock.now += 0.5
    assert not b.allows()


def test_success_resets_the_failure_streak() -> None:
    b = CircuitBreaker(failure_threshold=2, open_s=1, clock=Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state is BreakerState.CLOSED


def test_backoff_full_jitter_stays_under_exponential_cap() -> None:
    backoff = Backoff(initial_s=0.1, max_s=0.5, rng=random.Random(7))
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10, 0.5)]:
        delays = [backoff.delay(retry) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8, "full jitter spreads over the whole range"


# --- routing in the Gateway -------------------------------------------------------------


def _routes(workers: list[tuple[str, str, str]], *, capacity: int = 4, state: str = "ready",
            **facts: object) -> ModelRoutes:
    return ModelRoutes(
        name="m", kind="generate",
        workers=tuple(WorkerRoute(w, None, region, tier, state, capacity) for w, region, tier in workers),
        **facts,
    )


def _router(workers: list[tuple[str, str, str]], *, capacity: int = 4, max_queued: int = 2,
            **facts: object) -> ModelRouter:
    router = ModelRouter(
        _routes(workers, capacity=capacity, **facts), max_queued=max_queued, overloaded_retry_after_s=2,
        new_breaker=lambda: new_breaker(ResilienceConfig()), rng=random.Random(1),
    )
    router.update(router.routes)
    return router


def _ctx(timeout_s: float = 5.0) -> RequestContext:
    return RequestContext.new(timeout_s=timeout_s, api_key=None)


async def _acquire(router: ModelRouter, route: Route, avoid: frozenset[str] = frozenset(), timeout_s: float = 5.0):  # noqa: ANN202
    return await router.acquire(route, _ctx(timeout_s), avoid)


def _backend(router: ModelRouter, worker_id: str):  # noqa: ANN202
    return router.backends[worker_id]


SHARED_A = Route(SHARED_TIER, ("a",))


async def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    router = _router([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
    _backend(router, "w1").in_flight = 3
    assert (await _acquire(router, SHARED_A)).worker_id == "w2"


async def test_load_reported_through_the_table_counts_too() -> None:
    """Another Gateway's requests on w1 (its reported load) steer this one to w2."""
    router = _router([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
    loaded = ModelRoutes(name="m", kind="generate", workers=(
        WorkerRoute("w1", None, "a", SHARED_TIER, "ready", 4, load=3),
        WorkerRoute("w2", None, "a", SHARED_TIER, "ready", 4, load=0),
    ))
    router.update(loaded)
    for _ in range(10):
        backend = await _acquire(router, SHARED_A)
        assert backend.worker_id == "w2"
        router.release(backend)


async def test_a_table_update_keeps_what_this_replica_knows() -> None:
    router = _router([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
    w1 = await _acquire(router, SHARED_A)
    w1.breaker.trip()
    router.update(_routes([(w1.worker_id, "a", SHARED_TIER), ("w3", "a", SHARED_TIER)]))
    assert router.backends[w1.worker_id] is w1 and w1.in_flight == 1 and not w1.breaker.allows()
    assert set(router.backends) == {w1.worker_id, "w3"}, "w2 left the table; w3 joined it"


async def test_home_region_first_then_failover() -> None:
    router = _router([("a1", "a", SHARED_TIER), ("b1", "b", SHARED_TIER)])
    assert (await _acquire(router, Route(SHARED_TIER, ("b",)))).worker_id == "b1"
    assert (await _acquire(router, SHARED_A)).worker_id == "a1"
    router.saw_dead(_backend(router, "a1"))
    assert (await _acquire(router, SHARED_A)).worker_id == "b1", "region a has no live worker: fail over to b"


async def test_dedicated_tier_is_used_by_its_tenant_only() -> None:
    router = _router([("s1", "a", SHARED_TIER), ("d1", "a", "acme")])
    for _ in range(10):
        backend = await _acquire(router, SHARED_A)
        assert backend.worker_id == "s1"
        router.release(backend)
    assert (await _acquire(router, Route("acme", ("a",)))).worker_id == "d1"
    _backend(router, "d1").breaker.trip()
    assert (await _acquire(router, Route("acme", ("a",)))).worker_id == "s1", "own pool down: served by shared"


async def test_open_breaker_is_skipped_and_avoided_worker_used_last() -> None:
    router = _router([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
    _backend(router, "w1").breaker.trip()
    assert (await _acquire(router, SHARED_A)).worker_id == "w2"
    # w2 already failed this request: it is still used when nothing else is live.
    assert (await _acquire(router, SHARED_A, frozenset({"w2"}))).worker_id == "w2"
    _backend(router, "w2").breaker.trip()
    with pytest.raises(WorkerUnavailable, match="circuit open"):
        await _acquire(router, SHARED_A)


async def test_no_live_worker_errors_are_typed() -> None:
    with pytest.raises(ModelNotReady):
        await _acquire(_router([("w1", "a", SHARED_TIER)], state="loading"), SHARED_A)
    with pytest.raises(ModelNotReady, match="replacing"):
        await _acquire(_router([("w1", "a", SHARED_TIER)], state="dead", replacing=True), SHARED_A)
    failed = _router([("w1", "a", SHARED_TIER)], state="failed", error="artifact rejected")
    with pytest.raises(ModelLoadFailed, match="artifact rejected"):
        await _acquire(failed, SHARED_A)
    from haif.exceptions import GpuUnavailable

    with pytest.raises(GpuUnavailable, match="no GPU"):
        await _acquire(_router([], unplaceable="no GPU"), SHARED_A)


async def test_full_queue_answers_overloaded_at_once_and_queue_is_fifo() -> None:
    async def scenario() -> None:
        router = _router([("w1", "a", SHARED_TIER)], capacity=1, max_queued=2)
        held = await router.acquire(SHARED_A, _ctx(), frozenset())
        waiting = [asyncio.create_task(router.acquire(SHARED_A, _ctx(), frozenset())) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert router.status()["queued"] == 2
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await router.acquire(SHARED_A, _ctx(), frozenset())
        assert time.monotonic() - started < 0.1
        assert info.value.retry_after_s == 2
        router.release(held)
        first = await asyncio.wait_for(waiting[0], 1)
        assert not waiting[1].done(), "the second waiter keeps its place until a slot frees"
        router.release(first)
        router.release(await asyncio.wait_for(waiting[1], 1))
        assert _backend(router, "w1").in_flight == 0

    await scenario()


async def test_waiting_past_the_deadline_is_a_504() -> None:
    async def scenario() -> None:
        router = _router([("w1", "a", SHARED_TIER)], capacity=1, max_queued=5)
        await router.acquire(SHARED_A, _ctx(), frozenset())
        with pytest.raises(DeadlineExceeded):
            await router.acquire(SHARED_A, _ctx(0.05), frozenset())
        assert router.status()["queued"] == 0

    await scenario()


async def test_requests_wait_for_the_replacement_when_every_worker_died() -> None:
    async def scenario() -> None:
        router = _router([("w1", "a", SHARED_TIER)], ever_ready=True)
        router.saw_dead(_backend(router, "w1"))
        waiting = asyncio.create_task(router.acquire(SHARED_A, _ctx(), frozenset()))
        await asyncio.sleep(0.02)
        assert not waiting.done() and router.queued == 1
        # The Orchestrator's table: w1 replaced by w1' (a new actor), ready.
        router.update(_routes([("w1#new", "a", SHARED_TIER)], ever_ready=True))
        assert (await asyncio.wait_for(waiting, 1)).worker_id == "w1#new"

    await scenario()


# --- the fleet's replacement backoff -----------------------------------------------------------


def _slot() -> Slot:
    return Slot(name="haif/m/a/0@x", model=ModelConfig(name="m", runtime="echo"), region="a",
                tier=SHARED_TIER, index=0, state="ready")


def test_replacement_backoff_doubles_per_death() -> None:
    slot = _slot()
    delays = []
    for _ in range(4):
        slot.mark_dead("crash", replacement_backoff_max_s=1.0)
        delays.append(round(slot.replace_at - slot.died_at, 3))
        slot.state = "ready"  # replaced
    assert delays == [0.0, 0.5, 1.0, 1.0]


def test_a_worker_that_ran_long_is_not_a_crash_loop() -> None:
    slot = _slot()
    for _ in range(3):
        slot.mark_dead("crash", replacement_backoff_max_s=1.0)
        slot.state, slot.ready_since = "ready", time.monotonic() - 5  # replaced, then up for 5 s
    assert slot.deaths == 1 and slot.replace_at == slot.died_at


# --- config and the deadline header -------------------------------------------------------


def test_timeout_header_bounds() -> None:
    assert timeout_from(None, 60, 0.05, 600) == 60
    assert timeout_from(" 2.5 ", 60, 0.05, 600) == 2.5
    for bad in ["abc", "0", "-1", "601", "nan", "inf", "1e309"]:
        with pytest.raises(InvalidRequest, match="X-Request-Timeout"):
            timeout_from(bad, 60, 0.05, 600)


def test_regions_must_be_known() -> None:
    with pytest.raises(ValueError, match="unknown regions"):
        HaifConfig.model_validate(
            {"regions": [{"name": "a"}], "models": [{"name": "m", "runtime": "echo", "regions": ["b"]}]}
        )
    with pytest.raises(ValueError, match="unknown region"):
        HaifConfig.model_validate({"regions": [{"name": "a"}], "sharding": {"home_regions": {"t": "z"}}})
    config = HaifConfig.model_validate(
        {"regions": [{"name": "a"}, {"name": "b", "resource": "region-b"}],
         "models": [{"name": "m", "runtime": "echo", "regions": ["b", "a"]}],
         "sharding": {"home_regions": {"acme": "b"}}}
    )
    assert [r.name for r in config.model_regions(config.models[0])] == ["a", "b"]
    assert config.home_region("acme") == "b" and config.home_region("other") == "a"


# --- retry classification ------------------------------------------------------------------

CONFIG = HaifConfig.model_validate({"models": [{"name": "m", "runtime": "echo"}]})


def _item(key: str | None):  # noqa: ANN202
    from haif.config import LimitsConfig
    from haif.envelope import build_work_item
    from haif.protocol import CompletionRequest

    ctx = RequestContext.new(timeout_s=5, api_key=None, idempotency_key=key)
    return build_work_item("completion", CompletionRequest(model="m", prompt="hi"), ctx, LimitsConfig())


def test_what_is_retried() -> None:
    from ray.exceptions import ActorDiedError

    from haif.exceptions import InternalError, PromptTooLong

    reported: list[str] = []
    router = Router(CONFIG, on_dead=reported.append)
    model = _router([("w1", "a", SHARED_TIER)])
    backend = _backend(model, "w1")
    sent = time.monotonic()
    cases = [
        (ModelNotReady("loading"), None, True),  # raised before any work
        (Overloaded("busy", retry_after_s=1), None, True),
        (WorkerUnavailable("draining"), None, True),
        (InternalError("crashed mid-request"), None, False),  # may have run: only with a key
        (InternalError("crashed mid-request"), "k1", True),
        (PromptTooLong("too long"), "k1", False),  # the client's fault: never
        (DeadlineExceeded("late"), "k1", False),
    ]
    for exc, key, retry in cases:
        err, decided = router._failure(model, backend, exc, _item(key), sent)
        assert (type(err), decided) == (type(exc), retry), exc
    # A worker that died mid-request: retried only with a key; routed around, reported once...
    err, decided = router._failure(model, backend, ActorDiedError(), _item(None), sent)
    assert isinstance(err, WorkerUnavailable) and not decided and not backend.live()
    assert reported == ["w1"]
    # ...unless it was known dead before the request was sent (it cannot have run).
    err, decided = router._failure(model, backend, ActorDiedError(), _item(None), time.monotonic())
    assert decided and reported == ["w1"]


async def test_a_call_that_cannot_be_sent_gives_its_worker_slot_back() -> None:
    """`.remote()` itself can raise (an argument Ray cannot serialize): the in-flight
    count taken for the call is returned, or the worker would look busy for good."""
    import types

    from haif.exceptions import InternalError

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise InternalError("cannot serialize the request")

    method = types.SimpleNamespace(remote=refuse, options=lambda **_: types.SimpleNamespace(remote=refuse))
    actor = types.SimpleNamespace(generate=method, generate_stream=method,
                                  ping=types.SimpleNamespace(remote=lambda: None))
    router = Router(CONFIG)
    router.update(RoutingTable.of({"m": ModelRoutes(
        name="m", kind="generate", workers=(WorkerRoute("w1", actor, "local", SHARED_TIER, "ready", 4),)
    )}))

    async def scenario() -> None:
        with pytest.raises(InternalError):
            await router.call(_item(None), "generate")
        with pytest.raises(InternalError):
            async for _ in router.stream(_item(None)):
                pass

    await scenario()
    assert router.models["m"].backends["w1"].in_flight == 0
