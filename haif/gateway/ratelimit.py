"""Requests per minute on Redis, shared by every Gateway replica.

One Lua script per request makes check-and-count atomic: the window opens with the
first request (the key's expiry is set then) and closes 60 s later, as the database
windows do (``haif.store.quotas``). A refused request is not counted. Redis being
unreachable fails closed (503): quotas are not skipped.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from haif.exceptions import RateLimited, StoreUnavailable

if TYPE_CHECKING:
    from haif.config import RedisConfig

logger = logging.getLogger("haif.gateway")

WINDOW_MS = 60_000

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
            raise ValueError("RedisRateLimiter needs redis.url")
        self._client = redis.Redis.from_url(
            config.url,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_timeout_s,
        )
        self._script = self._client.register_script(_SCRIPT)
        self._prefix = config.key_prefix

    async def hit(self, tenant_id: int, requests_per_minute: int) -> None:
        """Count one request of ``tenant_id``.

        Raises:
            RateLimited: the window's requests are spent (Retry-After: when it closes).
            StoreUnavailable: Redis did not answer.
        """
        from redis.exceptions import RedisError

        key = f"{self._prefix}:rpm:{tenant_id}"
        try:
            allowed, ttl_ms = await self._script(keys=[key], args=[requests_per_minute, WINDOW_MS])
        except RedisError as exc:
            logger.warning("redis unavailable for rate limits: %s", exc)
            raise StoreUnavailable("the rate limiter is unavailable; retry later") from None
        if not int(allowed):
            raise RateLimited(
                f"rate limit reached: {requests_per_minute} requests per minute",
                retry_after_s=max(1.0, math.ceil(int(ttl_ms) / 1000)),
            )

    async def ping(self) -> Any:
        return await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()
