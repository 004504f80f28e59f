"""haif.store.quotas: anchored windows, what a request reserves, and why it is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from haif.exceptions import QuotaExceeded, RateLimited, UnprocessableRequest
from haif.store.quotas import Ask, Counters, QuotaLimits, ask_for, check, check_requests

pytestmark = pytest.mark.unit

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
EMPTY = Counters(None, 0, 0, None, 0, 0)


def test_windows_open_at_the_first_request_and_close_after_their_length() -> None:
    c = EMPTY.rolled(T0)
    assert c.minute_started_at == T0 and c.day_started_at == T0
    c = c.taken(Ask(1, 10, True))
    assert c.rolled(T0 + timedelta(seconds=59.9)) == c  # same windows
    later = c.rolled(T0 + timedelta(seconds=60))
    assert (later.minute_requests, later.minute_tokens) == (0, 0)
    assert later.minute_started_at == T0 + timedelta(seconds=60)
    assert later.day_tokens == 10 and later.day_started_at == T0  # the day goes on
    assert later.in_flight == 1  # concurrency is not a window
    assert c.rolled(T0 + timedelta(days=1)).day_tokens == 0


def test_requests_per_minute_refuses_the_one_over_with_retry_after() -> None:
    limits = QuotaLimits(requests_per_minute=2)
    c = EMPTY.rolled(T0)
    for _ in range(2):
        check_requests(limits, c, T0)
        c = c.taken(Ask(1, 0, False))
    with pytest.raises(RateLimited) as info:
        check_requests(limits, c, T0 + timedelta(seconds=20))
    assert info.value.retry_after_s == 40
    assert info.value.headers() == {"Retry-After": "40"}


def test_tokens_per_minute_and_per_day() -> None:
    limits = QuotaLimits(tokens_per_minute=100, tokens_per_day=150)
    c = EMPTY.rolled(T0).taken(Ask(0, 90, False))
    check(limits, c, Ask(0, 10, False), T0)
    with pytest.raises(RateLimited, match="100 tokens per minute"):
        check(limits, c, Ask(0, 11, False), T0)
    c = c.rolled(T0 + timedelta(minutes=5)).taken(Ask(0, 50, False))  # 140 today
    with pytest.raises(QuotaExceeded) as info:
        check(limits, c, Ask(0, 20, False), T0 + timedelta(minutes=5))
    assert info.value.status_code == 429 and info.value.code == "insufficient_quota"
    assert info.value.retry_after_s == pytest.approx(24 * 3600 - 300)


def test_a_request_larger_than_a_whole_window_is_422_not_429() -> None:
    with pytest.raises(UnprocessableRequest, match="tokens_per_minute is 100"):
        check(QuotaLimits(tokens_per_minute=100), EMPTY.rolled(T0), Ask(0, 101, False), T0)


def test_concurrency_slots() -> None:
    limits = QuotaLimits(max_concurrent=1)
    c = EMPTY.rolled(T0)
    check(limits, c, Ask(0, 0, True), T0)
    with pytest.raises(RateLimited, match="1 concurrent"):
        check(limits, c.taken(Ask(0, 0, True)), Ask(0, 0, True), T0)


def test_ask_takes_only_what_the_limits_count() -> None:
    assert ask_for(QuotaLimits(), tokens=50, count_requests=True) == Ask(0, 0, False)
    assert ask_for(QuotaLimits(requests_per_minute=5), tokens=50, count_requests=True) == Ask(
        1, 0, False
    )
    assert ask_for(QuotaLimits(requests_per_minute=5), tokens=50, count_requests=False) == Ask(
        0, 0, False
    )
    assert ask_for(
        QuotaLimits(tokens_per_day=5, max_concurrent=2), tokens=50, count_requests=True
    ) == Ask(0, 50, True)
    assert not QuotaLimits().limited and QuotaLimits(max_concurrent=0).limited
