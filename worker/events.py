"""A job's event log: read, and publish (the doorbell on Redis). server/follow.py follows it.

PostgreSQL is the truth here too. `job_events` holds every event, numbered by `jobs.event_seq` in the statement
that makes the change: the transitions (store.py, sweep.py) write `status` events, the heartbeat (heartbeat.py)
`progress` events and `log` lines, in the order the job's code reported them. After the commit the writer publishes
the job's id on Redis. A notification only says "look": a follower reads the log after the last seq it delivered,
so a lost notification can delay an event but never lose or repeat one. Followers also re-read the log when the
subscription (re)connects, and every `events_poll_s`.

    Notifier  publishes after commits, many jobs per message (every process that changes jobs has one)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple, TypeVar
from uuid import UUID

import msgspec
from databases import Database
from redis.asyncio import Redis

from worker import sql
from worker.connections import REDIS_DOWN
from worker.job import TERMINAL

log = logging.getLogger("outlast.events")
T = TypeVar("T")

EVERY_JOB: Final = b"*"  # the payload that pokes every followed job: the sweep moved some it does not name
READ_BATCH: Final = 500  # events per read of the log


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


# Many jobs' logs in one statement, each from its own seq: what a web process's followers of many running jobs
# need after one notification names them all (server/follow.py), instead of a statement per job.
_READ_MANY = """
SELECT w.id, e.seq, e.name, e.data, e.name = 'status' AND e.data->>'status' = ANY(CAST(:terminal AS text[])) AS final
  FROM unnest(CAST(:ids AS uuid[]), CAST(:afters AS int[])) AS w(id, after)
 CROSS JOIN LATERAL (SELECT seq, name, data FROM job_events
                      WHERE job_id = w.id AND seq > w.after ORDER BY seq LIMIT :limit) e
 ORDER BY w.id, e.seq
"""


async def read_many(
    db: Database, wanted: Sequence[tuple[UUID, int]], *, limit: int = READ_BATCH
) -> dict[UUID, list[Event]]:
    """Each job's events after its seq, oldest first, at most `limit` a job; a job with none is left out."""
    values = {"ids": [i for i, _ in wanted], "afters": [a for _, a in wanted], "limit": limit}
    return _by_id(await sql.fetch_all(db, _READ_MANY, values | {"terminal": sorted(TERMINAL)}))


def _by_id(rows: Sequence[Any]) -> dict[UUID, list[Event]]:
    found: dict[UUID, list[Event]] = {}
    for r in rows:
        event = Event(seq=r["seq"], name=r["name"], data=r["data"].encode(), final=r["final"])
        found.setdefault(r["id"], []).append(event)
    return found


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
_READ_WORKFLOWS = """
SELECT w.id, e.seq, e.name, e.data, e.final
  FROM unnest(CAST(:ids AS uuid[]), CAST(:afters AS int[])) AS w(id, after)
 CROSS JOIN LATERAL (
       SELECT seq, name, data,
              name = 'workflow' AND data->>'status' IN ('succeeded', 'failed', 'cancelled')
              AND NOT EXISTS (SELECT 1 FROM workflow_events l
                               WHERE l.workflow_id = x.workflow_id AND l.name = 'workflow' AND l.seq > x.seq) AS final
         FROM workflow_events x WHERE workflow_id = w.id AND seq > w.after ORDER BY seq LIMIT :limit) e
 ORDER BY w.id, e.seq
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


async def read_many_workflows(
    db: Database, wanted: Sequence[tuple[UUID, int]], *, limit: int = READ_BATCH
) -> dict[UUID, list[Event]]:
    """read_many for workflows' logs."""
    values = {"ids": [i for i, _ in wanted], "afters": [a for _, a in wanted], "limit": limit}
    return _by_id(await sql.fetch_all(db, _READ_WORKFLOWS, values))


async def workflow_latest_seqs(db: Database, workflow_ids: Sequence[UUID]) -> dict[UUID, int]:
    return {r["id"]: r["event_seq"] for r in await sql.fetch_all(db, _LATEST_WORKFLOW, {"ids": list(workflow_ids)})}


class Source(NamedTuple):
    """Whose log a follower reads: a job's or a workflow's."""

    read_after: Callable[[Database, UUID, int], Awaitable[list[Event]]]
    read_many: Callable[[Database, Sequence[tuple[UUID, int]]], Awaitable[dict[UUID, list[Event]]]]
    latest_seqs: Callable[[Database, Sequence[UUID]], Awaitable[dict[UUID, int]]]


JOB_LOG: Final = Source(read_after, read_many, latest_seqs)
WORKFLOW_LOG: Final = Source(read_workflow_after, read_many_workflows, workflow_latest_seqs)
