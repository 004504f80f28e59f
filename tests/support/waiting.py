"""Wait on a condition with a deadline, never on a fixed sleep.

The deadlines the tests pass are sized for a loaded 2-core machine; the interval only
sets how often the condition is polled. On a timeout the error names what was awaited
and the last value the condition returned.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_INTERVAL_S = 0.05


def wait_for(
    predicate: Callable[[], Any],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")
        time.sleep(interval_s)


async def wait_for_async(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    what: str = "condition",
) -> Any:
    """``wait_for`` inside an event loop: ``predicate`` may be sync or return an awaitable;
    the loop goes on running other tasks between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")
        await asyncio.sleep(interval_s)
