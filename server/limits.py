"""Rate limits kept in Redis, so every web process counts against the same numbers:

- failed authentications per client address: a fixed one-minute window (`AuthThrottle`).

Each check is one Lua script or one MULTI, so concurrent requests never race past a limit, and all time comes from
the Redis clock. When Redis is unreachable they fail open and log it: refusing every caller because the doorbell is
broken would turn a Redis outage into a full one.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger("outlast.web")
REDIS_DOWN = (RedisError, OSError)


class AuthThrottle:
    """Failed authentications per client address: past `limit` in a minute, the address gets 429 until the minute
    ends, before any key is looked up. The count is in Redis (every process adds to it); each process also
    remembers which addresses it has seen blocked, so a blocked address costs it no round trip at all."""

    WINDOW_S = 60
    _MEMORY = 10_000  # blocked addresses remembered per process; past it, expired ones are dropped

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._blocked: dict[str, float] = {}  # address -> monotonic time its block ends

    def blocked(self, client: str) -> int | None:
        """Seconds left on this address's block, if it is blocked."""
        until = self._blocked.get(client)
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[client]
            return None
        return math.ceil(left)

    async def failed(self, redis: Any, client: str) -> int | None:
        """Count a failure; seconds to block for when this one went past the limit."""
        name = f"outlast:auth-failures:{client}"
        try:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(name, 0, ex=self.WINDOW_S, nx=True)
                pipe.incr(name)
                pipe.ttl(name)
                _, count, ttl = await pipe.execute()
        except REDIS_DOWN as exc:
            log.warning("auth failure not counted: Redis unavailable (%s)", exc)
            return None
        if int(count) <= self.limit:
            return None
        left = max(1, int(ttl))
        if len(self._blocked) >= self._MEMORY:
            now = time.monotonic()
            self._blocked = {c: until for c, until in self._blocked.items() if until > now}
        self._blocked[client] = time.monotonic() + left
        return left
