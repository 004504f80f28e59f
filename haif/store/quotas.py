"""Quota arithmetic: limits, windows, what a request asks for, and why it is refused.

Pure (no SQL, no I/O) so that it is testable alone and cheap to import where a
``QuotaLimits`` travels (it rides on the ``Principal``). The ledger applies it under
a row lock.

Windows are anchored at their first request: a minute window opens with the first
request after the previous one closed and lasts 60 s; the day window likewise lasts
24 h. Within one window the counts are exact, whatever the number of Gateways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from haif.exceptions import QuotaExceeded, RateLimited, UnprocessableRequest

MINUTE = timedelta(seconds=60)
DAY = timedelta(days=1)
# Retry-After for a full concurrency slot set: slots free as requests finish.
CONCURRENCY_RETRY_S = 1.0


@dataclass(frozen=True)
class QuotaLimits:
    """A tenant's limits; ``None`` is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None

    @property
    def limited(self) -> bool:
        return (
            any(
                v is not None
                for v in (self.tokens_per_minute, self.tokens_per_day, self.max_concurrent)
            )
            or self.requests_per_minute is not None
        )

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute is not None or self.tokens_per_day is not None

    @classmethod
    def from_row(cls, row: Any) -> QuotaLimits:
        return cls(
            requests_per_minute=row.requests_per_minute,
            tokens_per_minute=row.tokens_per_minute,
            tokens_per_day=row.tokens_per_day,
            max_concurrent=row.max_concurrent,
        )

    def as_dict(self) -> dict[str, int | None]:
        return {
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "tokens_per_day": self.tokens_per_day,
            "max_concurrent": self.max_concurrent,
        }


@dataclass(frozen=True)
class Ask:
    """What one request takes from its tenant's windows when admitted."""

    requests: int  # 1 when requests-per-minute are counted in the database, else 0
    tokens: int  # reserved tokens: max_tokens per prompt plus the prompt estimate
    slot: bool  # takes one of max_concurrent


@dataclass(frozen=True)
class Counters:
    minute_started_at: datetime | None
    minute_requests: int
    minute_tokens: int
    day_started_at: datetime | None
    day_tokens: int
    in_flight: int

    @classmethod
    def from_row(cls, row: Any) -> Counters:
        return cls(
            row.minute_started_at,
            row.minute_requests,
            row.minute_tokens,
            row.day_started_at,
            row.day_tokens,
            row.in_flight,
        )

    def rolled(self, now: datetime) -> Counters:
        """The counters at ``now``: windows that have closed start again, empty."""
        out = self
        if out.minute_started_at is None or now - out.minute_started_at >= MINUTE:
            out = replace(out, minute_started_at=now, minute_requests=0, minute_tokens=0)
        if out.day_started_at is None or now - out.day_started_at >= DAY:
            out = replace(out, day_started_at=now, day_tokens=0)
        return out

    def taken(self, ask: Ask) -> Counters:
        return replace(
            self,
            minute_requests=self.minute_requests + ask.requests,
            minute_tokens=self.minute_tokens + ask.tokens,
            day_tokens=self.day_tokens + ask.tokens,
            in_flight=self.in_flight + int(ask.slot),
        )


def _left_s(started: datetime | None, length: timedelta, now: datetime) -> float:
    if started is None:
        return 1.0
    return max(1.0, math.ceil((started + length - now).total_seconds()))


def check_requests(limits: QuotaLimits, counters: Counters, now: datetime) -> None:
    """Refuse a request over requests_per_minute (counters already rolled).

    Raises:
        RateLimited: the minute's requests are spent (Retry-After: when the window closes).
    """
    rpm = limits.requests_per_minute
    if rpm is not None and counters.minute_requests + 1 > rpm:
        raise RateLimited(
            f"rate limit reached: {rpm} requests per minute",
            retry_after_s=_left_s(counters.minute_started_at, MINUTE, now),
        )


def check(limits: QuotaLimits, counters: Counters, ask: Ask, now: datetime) -> None:
    """Refuse ``ask``'s tokens and slot when they do not fit (counters already rolled).

    Requests per minute are checked apart (``check_requests``), before an
    Idempotency-Key is claimed, because replays count as requests too.

    Raises:
        UnprocessableRequest: the request alone needs more than a whole window allows.
        RateLimited: a per-minute or concurrency limit is reached (Retry-After set).
        QuotaExceeded: the day's tokens are spent.
    """
    tpm, tpd = limits.tokens_per_minute, limits.tokens_per_day
    for name, limit in (("tokens_per_minute", tpm), ("tokens_per_day", tpd)):
        if limit is not None and ask.tokens > limit:
            raise UnprocessableRequest(
                f"the request may use up to {ask.tokens} tokens; the tenant's {name} is {limit} "
                "(lower max_tokens or shorten the prompt)"
            )
    if tpm is not None and counters.minute_tokens + ask.tokens > tpm:
        raise RateLimited(
            f"rate limit reached: {tpm} tokens per minute",
            retry_after_s=_left_s(counters.minute_started_at, MINUTE, now),
        )
    if tpd is not None and counters.day_tokens + ask.tokens > tpd:
        raise QuotaExceeded(
            f"quota reached: {tpd} tokens per day",
            retry_after_s=_left_s(counters.day_started_at, DAY, now),
        )
    if (
        ask.slot
        and limits.max_concurrent is not None
        and counters.in_flight + 1 > limits.max_concurrent
    ):
        raise RateLimited(
            f"rate limit reached: {limits.max_concurrent} concurrent requests",
            retry_after_s=CONCURRENCY_RETRY_S,
        )


def ask_for(limits: QuotaLimits, *, tokens: int, count_requests: bool) -> Ask:
    """What a request of up to ``tokens`` tokens must reserve under ``limits``."""
    return Ask(
        requests=int(count_requests and limits.requests_per_minute is not None),
        tokens=tokens if limits.counts_tokens else 0,
        slot=limits.max_concurrent is not None,
    )
