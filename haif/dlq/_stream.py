"""The DLQ on Redis Streams: one stream, and a hash from job id to stream entry id.

A put is one Lua script, so it is atomic: it drops an earlier entry of the same job
(one entry per job, whatever the retries), forgets the ids of the oldest entries that
``XADD ... MAXLEN`` is about to trim, then adds the entry. Every entry carries its
job id, tenant, error, attempts and trace id as fields, and the whole entry as JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from haif.dlq.entry import DeadLetter
from haif.exceptions import ConfigError

if TYPE_CHECKING:
    from haif.config import DlqConfig, RedisConfig

_PUT = """
local stream, index = KEYS[1], KEYS[2]
local job, max = ARGV[1], tonumber(ARGV[2])
local old = redis.call('HGET', index, job)
if old then
  redis.call('XDEL', stream, old)
end
local n = redis.call('XLEN', stream)
if n >= max then
  for _, e in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', n - max + 1)) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'id' then redis.call('HDEL', index, f[i + 1]) end
    end
  end
end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local sid = redis.call('XADD', stream, 'MAXLEN', max, '*', unpack(fields))
redis.call('HSET', index, job, sid)
return sid
"""

_REMOVE = """
local sid = redis.call('HGET', KEYS[2], ARGV[1])
if not sid then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('XDEL', KEYS[1], sid)
"""

_PAGE = 200  # entries read per XREVRANGE while filtering by tenant


class RedisStream:
    """Synchronous (the CLI calls it; the Gateway calls it from a thread: puts are rare)."""

    def __init__(self, redis_config: RedisConfig, dlq: DlqConfig) -> None:
        import redis

        if not redis_config.url:
            raise ConfigError("the Redis DLQ needs redis.url")
        self._client = redis.Redis.from_url(
            redis_config.url,
            socket_timeout=redis_config.socket_timeout_s,
            socket_connect_timeout=redis_config.socket_timeout_s,
        )
        self.stream = f"{redis_config.key_prefix}:{dlq.stream}"
        self.index = f"{self.stream}:ids"
        self._max = dlq.max_entries
        self._put = self._client.register_script(_PUT)
        self._remove = self._client.register_script(_REMOVE)

    def put(self, entry: DeadLetter) -> str:
        """Add ``entry`` (replacing the job's earlier one); its stream entry id.

        Raises:
            redis.RedisError: Redis did not take it.
        """
        fields: list[Any] = [
            "id", entry.id,
            "tenant", entry.tenant,
            "error", f"{entry.error_type}: {entry.error}",
            "attempts", entry.attempts,
            "trace_id", entry.trace_id or "",
            "entry", entry.model_dump_json(),
        ]  # fmt: skip
        sid = self._put(keys=[self.stream, self.index], args=[entry.id, self._max, *fields])
        return sid.decode() if isinstance(sid, bytes) else str(sid)

    def get(self, entry_id: str) -> DeadLetter | None:
        sid = self._client.hget(self.index, entry_id)
        if sid is None:
            return None
        found = self._client.xrange(self.stream, sid, sid)
        return _entry(found[0][1]) if found else None

    def newest(self, limit: int, tenant: str | None = None) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        upper: bytes | str = "+"
        while len(out) < limit:
            count = limit - len(out) if tenant is None else _PAGE
            page = self._client.xrevrange(self.stream, upper, "-", count=count)
            for _sid, fields in page:
                if tenant is None or fields.get(b"tenant", b"").decode() == tenant:
                    out.append(_entry(fields))
                    if len(out) == limit:
                        break
            if len(page) < count:
                break
            upper = "(" + page[-1][0].decode()  # exclusive: the next page starts below it
        return out

    def remove(self, entry_id: str) -> bool:
        return bool(self._remove(keys=[self.stream, self.index], args=[entry_id]))

    def remove_all(self) -> int:
        count = int(self._client.xlen(self.stream))
        self._client.delete(self.stream, self.index)
        return count

    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._client.close()


def _entry(fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter.model_validate_json(fields[b"entry"])
