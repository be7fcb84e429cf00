"""Rate limits kept in Redis, so every web process counts against the same numbers:

- submits and redeliveries per API key: a token bucket each (`Budget`);
- failed authentications per client address: a fixed one-minute window (`AuthThrottle`);
- open event streams per API key, and per job for its read token's: leased slots (`StreamSlot`).

Each check is one Lua script or one MULTI, so concurrent requests never race past a limit, and all time comes from
the Redis clock. When Redis is unreachable they fail open and log it: a submit's row is durable without Redis (it
is the outbox), and refusing every caller because the doorbell is broken would turn a Redis outage into a full one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from server.problems import RateLimited
from worker.connections import REDIS_DOWN, script

log = logging.getLogger("outlast.web")
K = TypeVar("K")
V = TypeVar("V")


def pruned(entries: dict[K, V], keep: Callable[[V], bool], limit: int) -> dict[K, V]:
    """`entries`, cut down once it holds `limit`: to those `keep` approves, or to none when they would still fill
    half of it. Pruning then happens at most once per `limit / 2` insertions, however young the entries are (a scan
    on every insertion of a full map would cost each request as much as the map is long)."""
    if len(entries) < limit:
        return entries
    kept = {k: v for k, v in entries.items() if keep(v)}
    return kept if len(kept) < limit // 2 else {}


# KEYS[1]: the bucket (a hash of tokens, ts). ARGV: rate per second, burst, tokens wanted.
# Returns {tokens taken} (at least 1, at most wanted), or {0, seconds until one}.
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local taken = math.min(wanted, math.floor(tokens))
tokens = tokens - taken
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
if taken >= 1 then return {taken} end
return {0, tostring((1 - tokens) / rate)}
"""


class Budget:
    """Requests of one kind (`what`: submits, redeliveries) per API key: a token bucket in Redis that every web
    process draws from, so the limit holds across them. A process takes a key's tokens a few at a time (an eighth
    of the burst, at most 64, or as many as its concurrent requests of that key want) and spends them itself, so a
    busy key costs a round trip per handful of requests, not per request; tokens it has not spent within `HOLD_S`
    are dropped, never given back. Every request still spends a token that came out of the shared bucket: the limit
    is never exceeded, and a key spread over many processes may only meet it a little early. A burst under 16 is
    taken one token at a time, exactly as a single bucket would.

    One draw per key is on its way at a time: requests that find no held token while it is out wait for its answer
    and share what it took; when it took nothing, they are all refused with it. (Each drawing for itself, every
    answer but the last was thrown away, and 50 concurrent submits of a fresh key got 429 from about the tenth.)"""

    HOLD_S = 1.0
    MAX_CHUNK = 64
    MEMORY = 10_000  # keys holding tokens, per process

    def __init__(self, what: str = "submits") -> None:
        self.what = what
        self._held: dict[str, tuple[int, float]] = {}  # key: (tokens, monotonic time they lapse)
        self._drawing: dict[str, asyncio.Task[bool]] = {}  # key: its draw on its way
        self._wanting: dict[str, int] = {}  # key: submits waiting for its draw

    async def take(self, redis: Any, key: str, *, rate: float, burst: int) -> None:
        """Take one submit from `key`'s budget, or raise RateLimited with how long until the next one."""
        while not self._spend(key):
            drawing = self._drawing.get(key)
            if drawing is None:
                drawing = self._drawing[key] = asyncio.create_task(self._draw(redis, key, rate=rate, burst=burst))
                drawing.add_done_callback(lambda task: self._drawn(key, task))
            self._wanting[key] = self._wanting.get(key, 0) + 1
            try:
                if not await asyncio.shield(drawing):  # RateLimited: the bucket is empty for everyone waiting
                    return  # Redis is down: the limit fails open
            finally:
                self._wanting[key] -= 1
                if not self._wanting[key]:
                    del self._wanting[key]

    def _spend(self, key: str) -> bool:
        tokens, lapse = self._held.pop(key, (0, 0.0))
        if tokens <= 0 or lapse <= time.monotonic():
            return False
        if tokens > 1:
            self._held[key] = (tokens - 1, lapse)
        return True

    def _drawn(self, key: str, task: asyncio.Task[bool]) -> None:
        if self._drawing.get(key) is task:
            del self._drawing[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _draw(self, redis: Any, key: str, *, rate: float, burst: int) -> bool:
        """Draw tokens from the shared bucket for the submits waiting now, and a few for the next ones; hold them.
        False: Redis is unreachable."""
        wanted = min(self.MAX_CHUNK, max(1, burst // 8, self._wanting.get(key, 0)))
        try:
            answer = await script(redis, _BUCKET)(keys=[f"outlast:rate:{self.what}:{key}"], args=[rate, burst, wanted])
        except REDIS_DOWN as exc:
            log.warning("%s rate limit not applied: Redis unavailable (%s)", self.what, exc)
            return False
        taken = int(answer[0])
        if taken < 1:
            wait = math.ceil(float(answer[1]))
            pace = f"{rate:g} {self.what} a second" if rate >= 1 else f"{rate * 60:g} {self.what} a minute"
            raise RateLimited(f"more than {pace} with this API key; retry in {wait} s", wait)
        now = time.monotonic()
        self._held = pruned(self._held, lambda held: held[1] > now, self.MEMORY)
        held, _ = self._held.get(key, (0, 0.0))
        self._held[key] = (held + taken, now + self.HOLD_S)
        return True


class AuthThrottle:
    """Failed authentications per client address: past `limit` in a minute, the address gets 429 until the minute
    ends, before any key is looked up. The count is in Redis (every process adds to it); each process also
    remembers which addresses it has seen blocked, so a blocked address costs it no round trip at all."""

    WINDOW_S = 60
    MEMORY = 10_000  # blocked addresses remembered per process

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
        now = time.monotonic()
        # Forgetting a block costs one more failed attempt from that address, which Redis still counts.
        self._blocked = pruned(self._blocked, lambda until: until > now, self.MEMORY)
        self._blocked[client] = now + left
        return left


# KEYS[1]: a key's slots, a sorted set of slot id -> lease end (ms). ARGV: slot id, limit, lease (ms).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# The same arguments: extend a held slot's lease (XX: a slot that expired meanwhile is not brought back).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class StreamSlot:
    """One of an API key's open-stream slots: a lease in a Redis sorted set that its holder renews while the stream
    runs and releases when it ends. A holder that stops renewing (a process that died, a stream that never started)
    loses the slot when the lease runs out, so no key is locked out for good.

    For a streaming response, take the slot in the handler (a 429 must go out before any byte of the stream), then
    renew it with each keep-alive and release it in the body's `finally`.
    """

    def __init__(self, redis: Any, key: str, lease_s: float, *, held: bool) -> None:
        self.redis, self.held = redis, held
        self._name, self._id, self._lease_ms = f"outlast:streams:{key}", uuid.uuid4().hex, int(lease_s * 1000)

    @classmethod
    async def take(
        cls, redis: Any, key: str, *, limit: int, retry_after: int, lease_s: float = 60.0, holder: str = "this API key"
    ) -> StreamSlot:
        """One of `key`'s `limit` slots, or RateLimited (naming `holder`). Redis down: an unheld slot (the limit fails
        open)."""
        slot = cls(redis, key, lease_s, held=True)
        try:
            taken = await slot._run(_ACQUIRE, limit)
        except REDIS_DOWN as exc:
            log.warning("stream limit not applied: Redis unavailable (%s)", exc)
            return cls(redis, key, lease_s, held=False)
        if not taken:
            raise RateLimited(f"{holder} already has {limit} event streams open", retry_after)
        return slot

    async def _run(self, source: str, limit: int = 0) -> bool:
        args: list[str | int] = [self._id, limit, self._lease_ms]
        return int(await script(self.redis, source)(keys=[self._name], args=args)) == 1

    async def renew(self) -> None:
        """Extend the lease by `lease_s` from now: call it more often than that while the stream runs."""
        if self.held:
            with contextlib.suppress(*REDIS_DOWN):
                await self._run(_RENEW)

    async def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(*REDIS_DOWN):
                await asyncio.shield(self.redis.zrem(self._name, self._id))
