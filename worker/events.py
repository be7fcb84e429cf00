"""A job's event log: append (log lines) and publish (the doorbell on Redis) after each change.

PostgreSQL is the truth here too. `job_events` holds every event, numbered by `jobs.event_seq` in the statement
that makes the change: store.py's transitions write `status` and `progress` events, this module writes `log`
lines. After the commit the writer publishes the job's id on Redis. A notification only says "look": a follower
reads the log after the last seq it delivered, so a lost notification can delay an event but never lose or
repeat one.

    Journal   a running attempt's `ctx.log` lines, buffered and written in batches (the worker)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Final, TypeVar
from uuid import UUID

import msgspec
from databases import Database
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker import store
from worker.job import LOG_LEVELS, LogLevel

log = logging.getLogger("outlast.events")
T = TypeVar("T")

EVERY_JOB: Final = b"*"  # the payload that pokes every followed job: the sweep moved some it does not name
LOG_MAX_CHARS: Final = 2_000  # a longer log message is cut
LOG_MAX_PENDING: Final = 100  # log lines waiting for a write; more are dropped and counted


def channel(redis: Redis) -> str:
    """Pub/sub ignores database numbers: deployments that share a Redis server by index must not hear each other."""
    return f"outlast:events:{redis.connection_pool.connection_kwargs.get('db', 0)}"


async def publish(redis: Redis, job_id: UUID | None) -> None:
    """Ring the followers' doorbell after a commit (None: every followed job). Never raises, so a transition can't
    fail on Redis: the log is the truth, and followers re-read it when the subscription comes back."""
    try:
        await redis.publish(channel(redis), EVERY_JOB if job_id is None else str(job_id).encode())
    except (RedisError, OSError) as exc:
        log.debug("publish %s: Redis unavailable (%s); followers will read the log", job_id or "*", exc)


# -- appending log lines (the worker) ---------------------------------------------------------------


class LogLine(msgspec.Struct, frozen=True):
    """A `log` event's data."""

    level: LogLevel
    message: str


_APPEND_LOGS = """
WITH job AS (
    UPDATE jobs SET event_seq = event_seq + :n
     WHERE id = :id AND attempt = :attempt AND status = 'running'
    RETURNING id, event_seq
)
INSERT INTO job_events (job_id, seq, name, data)
SELECT job.id, job.event_seq - :n + line.n, 'log', line.data
  FROM job, jsonb_array_elements(CAST(:lines AS jsonb)) WITH ORDINALITY AS line(data, n)
RETURNING seq
"""
_encode = msgspec.json.Encoder().encode


async def append_logs(db: Database, job_id: UUID, attempt: int, lines: Sequence[LogLine]) -> bool:
    """Append log lines to a running attempt's log, in one statement. False: the attempt is over or superseded."""
    if not lines:
        return False
    values = {"id": job_id, "attempt": attempt, "n": len(lines), "lines": _encode(lines).decode()}
    return bool(await db.fetch_all(_APPEND_LOGS, values))


class Journal:
    """A running attempt's log lines (`ctx.log`): buffered, capped, and written in batches while the job runs.

    A write happens at most once per `interval_s` (the progress interval), so a chatty job costs a few commits a
    second however much it logs. At most LOG_MAX_PENDING lines wait for a write, each cut to LOG_MAX_CHARS;
    lines past that are dropped, and a `warning` line says how many.
    """

    def __init__(self, db: Database, redis: Redis, job_id: UUID, attempt: int, *, interval_s: float) -> None:
        self._db, self._redis, self._job_id, self._attempt = db, redis, job_id, attempt
        self._interval_s = interval_s
        self._pending: list[LogLine] = []
        self._dropped = 0
        self._ready = asyncio.Event()
        self._writing = asyncio.Lock()

    def write(self, level: LogLevel, message: str) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(sorted(LOG_LEVELS))}, not {level!r}")
        if len(self._pending) >= LOG_MAX_PENDING:
            self._dropped += 1
            return
        if len(message) > LOG_MAX_CHARS:
            message = message[: LOG_MAX_CHARS - 1] + "…"
        self._pending.append(LogLine(level, message))
        self._ready.set()

    async def flush(self) -> None:
        """Write what is pending. A database outage drops the batch: the job goes on, its log has a gap."""
        async with self._writing:
            await self._flush()

    async def _flush(self) -> None:
        lines, self._pending = self._pending, []
        if self._dropped:
            lines.append(LogLine("warning", f"{self._dropped} log lines dropped: over {LOG_MAX_PENDING} per write"))
            self._dropped = 0
        if not lines:
            return
        try:
            written = await append_logs(self._db, self._job_id, self._attempt, lines)
        except store.UNAVAILABLE as exc:
            log.warning("log of %s: database unavailable (%s); %d lines lost", self._job_id, exc, len(lines))
            return
        if written:
            await publish(self._redis, self._job_id)

    async def around(self, job: Awaitable[T]) -> T:
        """Run the job's coroutine while writing its log; the last lines are written before it returns or raises,
        so they come before the status event that ends the attempt."""
        writer = asyncio.create_task(self._write_while_running())
        try:
            return await job
        finally:
            try:
                async with self._writing:
                    pass  # a write under way ends first: cancelling it would lose its lines
            finally:
                writer.cancel()  # at once, before the writer can start another write
            await asyncio.wait([writer])  # unlike `await writer`, never mistakes its cancellation for ours
            try:
                await self.flush()
            except Exception:  # the job's own outcome matters more than its last log lines
                log.exception("log of %s: the last lines were not written", self._job_id)

    async def _write_while_running(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self.flush()
            await asyncio.sleep(self._interval_s)
