"""Circuit breaker, backoff, pool routing (power of two choices, regions, tiers, bounded
queue) and the client deadline header: the Orchestrator's logic without Ray."""

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
from haif.orchestrator.breaker import Backoff, BreakerState, CircuitBreaker
from haif.orchestrator.placement import Placement
from haif.orchestrator.pool import SHARED_TIER, ModelPool, Route, WorkerSlot, new_breaker


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


# --- pool routing ----------------------------------------------------------------------


def _pool(slots: list[tuple[str, str, str]], *, capacity: int = 4, max_queued: int = 2) -> ModelPool:
    model = ModelConfig(name="m", runtime="echo", max_concurrency=capacity, max_queued=max_queued)
    pool = ModelPool(model, Placement("m", False, 1.0), rng=random.Random(1), overloaded_retry_after_s=2)
    for worker_id, region, tier in slots:
        pool.slots.append(
            WorkerSlot(worker_id, actor=None, load_ref=None, breaker=new_breaker(ResilienceConfig()),
                       region=region, tier=tier, capacity=capacity, state="ready")
        )
    return pool


def _ctx(timeout_s: float = 5.0) -> RequestContext:
    return RequestContext.new(timeout_s=timeout_s, api_key=None)


def _acquire(pool: ModelPool, route: Route, avoid: frozenset[str] = frozenset(), timeout_s: float = 5.0):  # noqa: ANN202
    return asyncio.run(pool.acquire(route, _ctx(timeout_s), avoid))


SHARED_A = Route(SHARED_TIER, ("a",))


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    pool = _pool([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
    pool.slots[0].in_flight = 3
    assert _acquire(pool, SHARED_A).worker_id == "w2"


def test_home_region_first_then_failover() -> None:
    pool = _pool([("a1", "a", SHARED_TIER), ("b1", "b", SHARED_TIER)])
    assert _acquire(pool, Route(SHARED_TIER, ("b",))).worker_id == "b1"
    assert _acquire(pool, SHARED_A).worker_id == "a1"
    pool.mark_dead(pool.slots[0], "node removed", 30)
    assert _acquire(pool, SHARED_A).worker_id == "b1", "region a has no live worker: fail over to b"


def test_dedicated_tier_is_used_by_its_tenant_only() -> None:
    pool = _pool([("s1", "a", SHARED_TIER), ("d1", "a", "acme")])
    for _ in range(10):
        slot = _acquire(pool, SHARED_A)
        assert slot.worker_id == "s1"
        pool.release(slot)
    assert _acquire(pool, Route("acme", ("a",))).worker_id == "d1"
    pool.slots[1].breaker.trip()
    assert _acquire(pool, Route("acme", ("a",))).worker_id == "s1", "own pool down: served by shared"


def test_open_breaker_is_skipped_and_avoided_worker_used_last() -> None:
    pool = _pool([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
    pool.slots[0].breaker.trip()
    assert _acquire(pool, SHARED_A).worker_id == "w2"
    # w2 already failed this request: it is still used when nothing else is live.
    assert _acquire(pool, SHARED_A, frozenset({"w2"})).worker_id == "w2"
    pool.slots[1].breaker.trip()
    with pytest.raises(WorkerUnavailable, match="circuit open"):
        _acquire(pool, SHARED_A)


def test_no_live_worker_errors_are_typed() -> None:
    pool = _pool([("w1", "a", SHARED_TIER)])
    pool.slots[0].state = "loading"
    with pytest.raises(ModelNotReady):
        _acquire(pool, SHARED_A)
    pool.mark_dead(pool.slots[0], "killed", 30)
    with pytest.raises(ModelNotReady, match="replacing"):
        _acquire(pool, SHARED_A)
    pool.slots[0].state, pool.slots[0].error = "failed", "artifact rejected"
    with pytest.raises(ModelLoadFailed, match="artifact rejected"):
        _acquire(pool, SHARED_A)


def test_full_queue_answers_overloaded_at_once_and_queue_is_fifo() -> None:
    async def scenario() -> None:
        pool = _pool([("w1", "a", SHARED_TIER)], capacity=1, max_queued=2)
        held = await pool.acquire(SHARED_A, _ctx(), frozenset())
        waiting = [asyncio.create_task(pool.acquire(SHARED_A, _ctx(), frozenset())) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert pool.status()["queued"] == 2
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await pool.acquire(SHARED_A, _ctx(), frozenset())
        assert time.monotonic() - started < 0.1
        assert info.value.retry_after_s == 2
        pool.release(held)
        first = await asyncio.wait_for(waiting[0], 1)
        assert not waiting[1].done(), "the second waiter keeps its place until a slot frees"
        pool.release(first)
        pool.release(await asyncio.wait_for(waiting[1], 1))
        assert pool.slots[0].in_flight == 0

    asyncio.run(scenario())


def test_waiting_past_the_deadline_is_a_504() -> None:
    async def scenario() -> None:
        pool = _pool([("w1", "a", SHARED_TIER)], capacity=1, max_queued=5)
        await pool.acquire(SHARED_A, _ctx(), frozenset())
        with pytest.raises(DeadlineExceeded):
            await pool.acquire(SHARED_A, _ctx(0.05), frozenset())
        assert pool.status()["queued"] == 0

    asyncio.run(scenario())


def test_replacement_backoff_doubles_per_death() -> None:
    pool = _pool([("w1", "a", SHARED_TIER)])
    slot = pool.slots[0]
    delays = []
    for _ in range(4):
        pool.mark_dead(slot, "crash", replacement_backoff_max_s=1.0)
        delays.append(round(slot.replace_at - slot.died_at, 3))
        slot.state = "ready"  # replaced
    assert delays == [0.0, 0.5, 1.0, 1.0]


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


def _orchestrator():  # noqa: ANN202
    from haif.orchestrator.deployment import Orchestrator

    orch = Orchestrator.__new__(Orchestrator)  # the routing logic alone: no Ray, no Serve
    orch._res = ResilienceConfig()
    return orch


def _item(key: str | None):  # noqa: ANN202
    from haif.config import LimitsConfig
    from haif.envelope import build_work_item
    from haif.protocol import CompletionRequest

    ctx = RequestContext.new(timeout_s=5, api_key=None, idempotency_key=key)
    return build_work_item("completion", CompletionRequest(model="m", prompt="hi"), ctx, LimitsConfig())


def test_what_is_retried() -> None:
    from ray.exceptions import ActorDiedError

    from haif.exceptions import InternalError, PromptTooLong

    orch = _orchestrator()
    pool = _pool([("w1", "a", SHARED_TIER)])
    slot = pool.slots[0]
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
        err, decided = orch._failure(pool, slot, slot.actor, exc, _item(key), sent)
        assert (type(err), decided) == (type(exc), retry), exc
    # A worker that died mid-request: retried only with a key...
    err, decided = orch._failure(pool, slot, slot.actor, ActorDiedError(), _item(None), sent)
    assert isinstance(err, WorkerUnavailable) and not decided and slot.state == "dead"
    # ...unless it was known dead before the request was sent (it cannot have run).
    err, decided = orch._failure(pool, slot, slot.actor, ActorDiedError(), _item(None), time.monotonic())
    assert decided


def test_late_failures_of_a_replaced_worker_leave_its_replacement_alone() -> None:
    """Requests that were on a worker when it died can fail after its replacement started:
    they must neither open the replacement's breaker nor mark it dead."""
    from ray.exceptions import ActorDiedError

    from haif.exceptions import InternalError

    orch = _orchestrator()
    pool = _pool([("w1", "a", SHARED_TIER)])
    slot = pool.slots[0]
    old, sent = object(), time.monotonic()
    slot.actor = old
    pool.mark_dead(slot, "SIGKILL", 30)
    slot.actor, slot.generation, slot.state = object(), 1, "loading"  # the replacement
    slot.breaker = new_breaker(ResilienceConfig())
    for _ in range(ResilienceConfig().breaker_failure_threshold + 1):
        err, retry = orch._failure(pool, slot, old, InternalError("lost"), _item("k"), sent)
        assert isinstance(err, InternalError) and retry  # still the old request's answer
    err, retry = orch._failure(pool, slot, old, ActorDiedError(), _item(None), sent)
    assert isinstance(err, WorkerUnavailable) and not retry  # it may have run: no key, no retry
    assert slot.state == "loading" and slot.breaker.allows()
    # The same failures from the current worker do count.
    for _ in range(ResilienceConfig().breaker_failure_threshold):
        orch._failure(pool, slot, slot.actor, InternalError("lost"), _item("k"), sent)
    assert not slot.breaker.allows()


def test_requests_wait_for_the_replacement_when_every_worker_died() -> None:
    async def scenario() -> None:
        pool = _pool([("w1", "a", SHARED_TIER)])
        pool.ever_ready = True
        slot = pool.slots[0]
        pool.mark_dead(slot, "SIGKILL", 30)
        waiting = asyncio.create_task(pool.acquire(SHARED_A, _ctx(), frozenset()))
        await asyncio.sleep(0.02)
        assert not waiting.done() and pool.queued == 1
        slot.generation, slot.state = 1, "ready"  # the replacement loaded (a fresh breaker)
        slot.breaker.success()
        pool._wake_all()
        assert (await asyncio.wait_for(waiting, 1)) is slot

    asyncio.run(scenario())


def test_a_worker_that_ran_long_is_not_a_crash_loop() -> None:
    pool = _pool([("w1", "a", SHARED_TIER)])
    slot = pool.slots[0]
    for _ in range(3):
        pool.mark_dead(slot, "crash", replacement_backoff_max_s=1.0)
        slot.state, slot.ready_since = "ready", time.monotonic() - 5  # replaced, then up for 5 s
    assert slot.deaths == 1 and slot.replace_at == slot.died_at


def test_a_replacement_is_routed_as_soon_as_its_load_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at the next health round: requests sent right after the load reach it."""
    import types

    from haif.orchestrator import pool as pool_module

    # ray.wait / ray.get over plain futures: the pool's settling logic, without a cluster.
    fake_ray = types.SimpleNamespace(
        wait=lambda refs, num_returns, timeout: ([r for r in refs if r.done()], [r for r in refs if not r.done()]),
        get=lambda ref: ref.result(),
        kill=lambda actor: None,
    )
    monkeypatch.setattr(pool_module, "ray", fake_ray)

    async def scenario() -> None:
        orch = _orchestrator()
        orch._settling = set()
        pool = _pool([("w1", "a", SHARED_TIER), ("w2", "a", SHARED_TIER)])
        slot = pool.slots[1]
        pool.mark_dead(slot, "SIGKILL", 30)
        load = asyncio.get_running_loop().create_future()
        slot.state, slot.generation, slot.load_ref = "loading", 1, load
        slot.breaker = new_breaker(ResilienceConfig())
        orch._settle_when_loaded(pool, load)
        await asyncio.sleep(0.01)
        assert slot.state == "loading"
        load.set_result(None)
        await asyncio.sleep(0.01)  # no health round runs in this test
        assert slot.state == "ready" and slot.live() and not orch._settling
        # A failed load is recorded the same way.
        broken = asyncio.get_running_loop().create_future()
        slot.state, slot.load_ref = "loading", broken
        orch._settle_when_loaded(pool, broken)
        broken.set_exception(RuntimeError("weights missing"))
        await asyncio.sleep(0.01)
        assert slot.state == "failed" and "weights missing" in (slot.error or "")

    asyncio.run(scenario())


def test_a_call_that_cannot_be_sent_gives_its_worker_slot_back() -> None:
    """`.remote()` itself can raise (an argument Ray cannot serialize): the in-flight
    count taken for the call is returned, or the worker would look busy for good."""
    import types

    from haif.exceptions import InternalError

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise InternalError("cannot serialize the request")

    method = types.SimpleNamespace(remote=refuse, options=lambda **_: types.SimpleNamespace(remote=refuse))
    orch = _orchestrator()
    orch._config = HaifConfig.model_validate({"models": [{"name": "m", "runtime": "echo"}]})
    pool = _pool([("w1", "a", SHARED_TIER)])
    pool.slots[0].actor = types.SimpleNamespace(generate=method, generate_stream=method)
    orch._pools, orch._health_task = {"m": pool}, None

    async def scenario() -> None:
        with pytest.raises(InternalError):
            await orch._unary_attempts(_item(None), "generate", "generate")
        with pytest.raises(InternalError):
            async for _ in orch._stream_attempts(_item(None)):
                pass

    asyncio.run(scenario())
    assert pool.slots[0].in_flight == 0
