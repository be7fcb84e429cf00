"""A job's event log: append (log lines), read, and publish (the doorbell on Redis). server/follow.py follows it.

PostgreSQL is the truth here too. `job_events` holds every event, numbered by `jobs.event_seq` in the statement
that makes the change: the transitions (store.py, sweep.py) write `status` events, the heartbeat (heartbeat.py)
`progress` events, and this module `log` lines. After the commit the writer publishes the job's id on Redis. A
notification only says "look": a follower reads the log after the last seq it delivered, so a lost notification
can delay an event but never lose or repeat one. Followers also re-read the log when the subscription
(re)connects, and every `events_poll_s`.

    Notifier  publishes after commits, many jobs per message (every process that changes jobs has one)
    Journal   a running attempt's `ctx.log` lines, buffered and written in batches (the worker)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, NamedTuple, TypeVar
from uuid import UUID

import msgspec
from databases import Database
from redis.asyncio import Redis

from worker import database, sql
from worker.connections import REDIS_DOWN
from worker.job import LOG_LEVELS, TERMINAL, LogLevel

log = logging.getLogger("outlast.events")
T = TypeVar("T")

EVERY_JOB: Final = b"*"  # the payload that pokes every followed job: the sweep moved some it does not name
READ_BATCH: Final = 500  # events per read of the log
LOG_MAX_CHARS: Final = 2_000  # a longer log message is cut
LOG_MAX_PENDING: Final = 100  # log lines waiting for a write; more are dropped and counted


def channel(redis: Redis) -> str:
    """Pub/sub ignores database numbers: deployments that share a Redis server by index must not hear each other."""
    return f"outlast:events:{redis.connection_pool.connection_kwargs.get('db', 0)}"


async def _publish(redis: Redis, payload: bytes) -> None:
    """Ring the followers' doorbell. Never raises, so a transition can't fail on Redis: the log is the truth, and
    followers re-read it when the subscription comes back."""
    try:
        await redis.publish(channel(redis), payload)
    except REDIS_DOWN as exc:
        log.debug("publish %r: Redis unavailable (%s); followers will read the log", payload[:80], exc)


class Notifier:
    """The followers' doorbell, rung after each commit that changes a job: the jobs notified while one PUBLISH is on
    its way go out together in the next, one message naming them all (space-separated). A worker finishing dozens
    of jobs at once pays a round trip per batch instead of two per job, and a job notified twice in a batch
    (claimed, then done) is named once.

    `notify` (None: every followed job) never waits and never raises; the notification leaves within a round trip.
    `flush` waits until what is pending has gone out.
    """

    BATCH: Final = 1_000  # ids per message at most

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: set[bytes] = set()
        self._sending: asyncio.Task[None] | None = None

    def notify(self, job_id: UUID | None) -> None:
        self._pending.add(EVERY_JOB if job_id is None else str(job_id).encode())
        if self._sending is None:
            self._sending = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._pending:
                batch = [self._pending.pop() for _ in range(min(self.BATCH, len(self._pending)))]
                await _publish(self._redis, EVERY_JOB if EVERY_JOB in batch else b" ".join(batch))
        finally:
            self._sending = None

    async def flush(self) -> None:
        if self._sending is not None:
            await self._sending


# -- reading the log --------------------------------------------------------------------------------


class Event(msgspec.Struct, frozen=True, gc=False):
    """One stored event: `data` is its JSON as stored (a status event's is rendered by worker/resource.py)."""

    seq: int
    name: str  # status, progress or log
    data: bytes
    final: bool  # a terminal status event: the last a job ever has


_READ = """
SELECT seq, name, data, name = 'status' AND data->>'status' = ANY(CAST(:terminal AS text[])) AS final
  FROM job_events WHERE job_id = :id AND seq > :after ORDER BY seq LIMIT :limit
"""


async def read_after(db: Database, job_id: UUID, after: int, *, limit: int = READ_BATCH) -> list[Event]:
    """The job's events after seq `after`, oldest first, at most `limit`."""
    values = {"id": job_id, "after": after, "limit": limit, "terminal": sorted(TERMINAL)}
    return [
        Event(seq=r["seq"], name=r["name"], data=r["data"].encode(), final=r["final"])
        for r in await sql.fetch_all(db, _READ, values)
    ]


_LATEST = "SELECT id, event_seq FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"


async def latest_seqs(db: Database, job_ids: Sequence[UUID]) -> dict[UUID, int]:
    """The last seq of each job that still exists."""
    return {r["id"]: r["event_seq"] for r in await sql.fetch_all(db, _LATEST, {"ids": list(job_ids)})}


# A workflow's log (migrations/0015_workflow_events.sql): `step` and `workflow` events, written by triggers. A
# workflow's id is a UUID in the same space as jobs', so the same Notifier and Hub carry it; only the reads differ.
# Final: the workflow's last end. A resumed workflow ended before, and its stream goes on past that end.
_READ_WORKFLOW = """
SELECT seq, name, data,
       name = 'workflow' AND data->>'status' IN ('succeeded', 'failed', 'cancelled')
       AND NOT EXISTS (SELECT 1 FROM workflow_events l
                        WHERE l.workflow_id = e.workflow_id AND l.name = 'workflow' AND l.seq > e.seq) AS final
  FROM workflow_events e WHERE workflow_id = :id AND seq > :after ORDER BY seq LIMIT :limit
"""
_LATEST_WORKFLOW = "SELECT id, event_seq FROM workflows WHERE id = ANY(CAST(:ids AS uuid[]))"


async def read_workflow_after(db: Database, workflow_id: UUID, after: int, *, limit: int = READ_BATCH) -> list[Event]:
    """The workflow's events after seq `after`, oldest first, at most `limit`; the last a workflow that ended has is
    `final` (a resume writes more after it)."""
    values = {"id": workflow_id, "after": after, "limit": limit}
    return [
        Event(seq=r["seq"], name=r["name"], data=r["data"].encode(), final=r["final"])
        for r in await sql.fetch_all(db, _READ_WORKFLOW, values)
    ]


async def workflow_latest_seqs(db: Database, workflow_ids: Sequence[UUID]) -> dict[UUID, int]:
    return {r["id"]: r["event_seq"] for r in await sql.fetch_all(db, _LATEST_WORKFLOW, {"ids": list(workflow_ids)})}


class Source(NamedTuple):
    """Whose log a follower reads: a job's or a workflow's."""

    read_after: Callable[[Database, UUID, int], Awaitable[list[Event]]]
    latest_seqs: Callable[[Database, Sequence[UUID]], Awaitable[dict[UUID, int]]]


JOB_LOG: Final = Source(read_after, latest_seqs)
WORKFLOW_LOG: Final = Source(read_workflow_after, workflow_latest_seqs)


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


async def append_logs(db: Database, job_id: UUID, attempt: int, lines: Sequence[LogLine]) -> bool:
    """Append log lines to a running attempt's log, in one statement. False: the attempt is over or superseded."""
    if not lines:
        return False
    values = {"id": job_id, "attempt": attempt, "n": len(lines), "lines": database.storable(lines)}
    return bool(await sql.fetch_all(db, _APPEND_LOGS, values))


class Journal:
    """A running attempt's log lines (`ctx.log`): buffered, capped, and written in batches while the job runs.

    A write happens at most once per `interval_s` (the progress interval), so a chatty job costs a few commits a
    second however much it logs. At most LOG_MAX_PENDING lines wait for a write, each cut to LOG_MAX_CHARS;
    lines past that are dropped, and a `warning` line says how many.
    """

    def __init__(self, db: Database, notifier: Notifier, job_id: UUID, attempt: int, *, interval_s: float) -> None:
        self._db, self._notifier, self._job_id, self._attempt = db, notifier, job_id, attempt
        self._interval_s = interval_s
        self._pending: list[LogLine] = []
        self._dropped = 0
        self._ready = asyncio.Event()
        self._writing = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None  # started by the first line: most jobs never log
        self._over = False  # the job has returned: a line a task it left behind writes now is refused anyway

    def write(self, level: LogLevel, message: str) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(sorted(LOG_LEVELS))}, not {level!r}")
        if self._over:
            return
        if len(self._pending) >= LOG_MAX_PENDING:
            self._dropped += 1
            return
        if len(message) > LOG_MAX_CHARS:
            message = message[: LOG_MAX_CHARS - 1] + "…"
        self._pending.append(LogLine(level, message))
        self._ready.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_while_running())

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
        except database.UNAVAILABLE as exc:
            log.warning("log of %s: database unavailable (%s); %d lines lost", self._job_id, exc, len(lines))
            return
        if written:
            self._notifier.notify(self._job_id)

    async def around(self, job: Awaitable[T]) -> T:
        """Run the job's coroutine while writing its log; the last lines are written before it returns or raises,
        so they come before the status event that ends the attempt."""
        try:
            return await job
        finally:
            self._over = True
            if (writer := self._writer) is not None:
                await self._last(writer)

    async def _last(self, writer: asyncio.Task[None]) -> None:
        """Stop the writer, then write what it left."""
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
