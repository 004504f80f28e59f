"""Requests per minute on Redis, shared by every Gateway replica.

One Lua script per request makes check-and-count atomic: the window opens with the
first request (the key's expiry is set then) and closes 60 s later, as the database
windows do (``haif.store.quotas``). A refused request is not counted. Redis being
unreachable fails closed (503), or, by default, sends the tenant's requests to the
metadata store's own count for ``quotas.redis_retry_after_s`` (``haif.gateway.quota``):
that count does not see what Redis counted, so across a switch a tenant may be admitted
up to twice its limit in one minute.

Concurrent requests share round trips: the hits that arrive while one pipeline is on the
wire go out together in the next (at most ``MAX_BATCH`` scripts each, one connection),
so a burst of hundreds of requests on one replica makes a handful of round trips, not
hundreds of connections (redis-py's pool refuses the 101st: "Too many connections").
Each script stays atomic; their order in a pipeline is the order of arrival.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

from haif.exceptions import ConfigError, RateLimited, StoreUnavailable

if TYPE_CHECKING:
    from haif.config import RedisConfig

logger = logging.getLogger("haif.gateway")

WINDOW_MS = 60_000
MAX_BATCH = 256  # scripts in one pipeline

_SCRIPT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    ttl = tonumber(ARGV[2])
  end
  return {0, ttl}
end
count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {1, redis.call('PTTL', KEYS[1])}
"""


class RedisRateLimiter:
    def __init__(self, config: RedisConfig) -> None:
        import redis.asyncio as redis

        if not config.url:
            raise ConfigError("RedisRateLimiter needs redis.url")
        self._client = redis.Redis.from_url(
            config.url,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_timeout_s,
        )
        self._sha: str | None = None  # the script's, once Redis has it
        self._prefix = config.key_prefix
        self._pending: list[tuple[str, int, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.round_trips = 0  # pipelines sent: what coalescing saves is visible

    async def hit(self, tenant_id: int, requests_per_minute: int) -> None:
        """Count one request of ``tenant_id``.

        Raises:
            RateLimited: the window's requests are spent (Retry-After: when it closes).
            StoreUnavailable: Redis did not answer.
        """
        key = f"{self._prefix}:rpm:{tenant_id}"
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((key, requests_per_minute, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="haif-ratelimit")
        allowed, ttl_ms = await done
        if not int(allowed):
            raise RateLimited(
                f"rate limit reached: {requests_per_minute} requests per minute",
                retry_after_s=max(1.0, math.ceil(int(ttl_ms) / 1000)),
            )

    async def _send(self) -> None:
        """Send what is pending, one pipeline at a time, until nothing is."""
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                results = await self._run(batch)
            except asyncio.CancelledError:
                self._fail(batch, "the rate limiter is closing")
                raise
            except Exception as exc:  # noqa: BLE001 - every waiter gets an answer
                from redis.exceptions import RedisError

                log = logger.warning if isinstance(exc, (RedisError, OSError)) else logger.exception
                log("redis unavailable for rate limits: %s", exc)
                results = [exc] * len(batch)
            for (_, _, done), result in zip(batch, results, strict=True):
                if done.done():  # the request went away; its hit may have counted
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(
                        StoreUnavailable("the rate limiter is unavailable; retry later")
                    )
                else:
                    done.set_result(result)

    async def _run(self, batch: list[tuple[str, int, asyncio.Future[Any]]]) -> list[Any]:
        """One pipeline of EVALSHAs; a script Redis lost (restart, SCRIPT FLUSH) is loaded
        again and the scripts it refused, which did not run, are sent once more."""
        from redis.exceptions import NoScriptError

        if self._sha is None:
            self._sha = await self._client.script_load(_SCRIPT)
        results = await self._pipeline(batch)
        lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if lost:
            self._sha = await self._client.script_load(_SCRIPT)
            for i, result in zip(lost, await self._pipeline([batch[i] for i in lost]), strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[tuple[str, int, asyncio.Future[Any]]]) -> list[Any]:
        self.round_trips += 1
        async with self._client.pipeline(transaction=False) as pipe:
            for key, rpm, _ in batch:
                pipe.evalsha(self._sha, 1, key, rpm, WINDOW_MS)
            return list(await pipe.execute(raise_on_error=False))

    @staticmethod
    def _fail(batch: list[tuple[str, int, asyncio.Future[Any]]], why: str) -> None:
        for _, _, done in batch:
            if not done.done():
                done.set_exception(StoreUnavailable(why))

    async def ping(self) -> Any:
        return await self._client.ping()

    async def close(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        pending, self._pending = self._pending, []
        self._fail(pending, "the rate limiter is closing")
        await self._client.aclose()
