"""A tenant's feed of job changes (GET /v1/events): the log migrations/0023 writes, read in order and resumably.

Every change of a job's status or progress adds a row naming the job. A reader takes only the rows of transactions
older than every one still running, ordered by (transaction id, row id): that set grows only at its end, so a
cursor past a row never meets a row that commits before it later. A `Cursor` is that pair; `boundary` is where
the final set ends when nothing newer is final yet, which is where a new reader starts.

The feed shows each job as it is when read (the Job without input and result): a reader that is behind sees a
job's latest state, once per read however often it changed meanwhile.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final, NamedTuple
from uuid import UUID

import msgspec
from databases import Database

from worker import resource, sql
from worker.job import TERMINAL, Error, Links, Progress, Status

READ_BATCH: Final = 500  # log rows per read
KEEP_S: Final = 86_400.0  # a day of changes: a client away longer reads the jobs again
_CURSOR = re.compile(r"(\d{1,20})\.(\d{1,19})")


class Cursor(NamedTuple):
    """A place in a tenant's feed: the event's transaction id and its own id; (xmin, 0) for a boundary."""

    xid: int
    id: int

    def __str__(self) -> str:
        return f"{self.xid}.{self.id}"

    @classmethod
    def parse(cls, text: str) -> Cursor | None:
        match = _CURSOR.fullmatch(text)
        return None if match is None else cls(int(match[1]), int(match[2]))


class JobFields(msgspec.Struct, frozen=True, kw_only=True):
    """What the feed shows of a job: the Job without its input and result, which may be large, nor what Python adds."""

    id: UUID
    type: str
    status: Status
    progress: Progress
    attempt: int
    max_attempts: int
    error: Error | None
    metadata: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    retry_of: UUID | None
    workflow_id: UUID | None
    step: str | None
    parent_id: UUID | None


class FeedJob(JobFields, frozen=True, kw_only=True):
    """A `job` event's data on GET /v1/events."""

    done: bool
    links: Links


class Change(NamedTuple):
    cursor: Cursor
    job: FeedRow


class Batch(NamedTuple):
    """One read: its changes, the cursor to read on from, and whether it was full (more is there already)."""

    changes: list[Change]
    high: Cursor
    full: bool


# One JSON value per read, decoded by msgspec in one call: as rows, asyncpg's 17 columns an event and three JSON
# decodes a job were 12.4 us of the web's CPU per change, one value 7.0 us (medians of five alternating runs of a
# 500-event read, 1.9 events a job). The
# LIMIT counts events (a deleted job's too, which the JOIN then skips); `latest` keeps each job once, at its last.
_READ = """
WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
batch AS MATERIALIZED (
    SELECT e.xid, CAST(CAST(e.xid AS text) AS numeric) AS x, e.id AS seq, e.job_id
      FROM snap, tenant_events e
     WHERE e.tenant_id = :tenant AND (e.xid, e.id) > (CAST(:xid AS xid8), :seq) AND e.xid < snap.xmin
     ORDER BY e.xid, e.id
     LIMIT :limit
),
latest AS (SELECT DISTINCT ON (job_id) job_id, xid, x, seq FROM batch ORDER BY job_id, xid DESC, seq DESC)
SELECT json_build_object(
    'xmin', (SELECT CAST(CAST(xmin AS text) AS numeric) FROM snap),
    'rows', (SELECT count(*) FROM batch),
    'last', (SELECT json_build_array(x, seq) FROM batch ORDER BY xid DESC, seq DESC LIMIT 1),
    'changes', (SELECT coalesce(json_agg(json_build_array(
        j.id, j.type, j.status, j.progress, j.attempt, j.max_attempts, j.error, j.metadata, j.created_at,
        j.started_at, j.finished_at, j.retry_of, j.workflow_id, j.step, j.parent_id, l.x, l.seq)
        ORDER BY l.xid, l.seq), '[]') FROM latest l JOIN jobs j ON j.id = l.job_id))
"""
_BOUNDARY = "SELECT CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text)"


class FeedRow(JobFields, frozen=True, kw_only=True, array_like=True):
    """A job as a read found it, and where it last changed in the read. A dashboard's row needs only a few of its
    fields, so the FeedJob is built (`as_job`) only for a stream that sends it whole (under py-spy, building it was
    0.6 of the read's 1.6 % of the web's samples)."""

    xid: int
    seq: int


class _Read(msgspec.Struct, frozen=True):
    xmin: int  # the boundary now
    rows: int  # events read, at most the limit
    last: tuple[int, int] | None  # the last event's cursor
    changes: list[FeedRow]


_decode_read = msgspec.json.Decoder(_Read).decode
_FIELDS: Final = JobFields.__struct_fields__


def as_job(row: FeedRow) -> FeedJob:
    fields = {name: getattr(row, name) for name in _FIELDS}
    return FeedJob(**fields, done=row.status in TERMINAL, links=resource.links(row.id))


async def boundary(db: Database) -> Cursor:
    """Where the final part of every feed ends now: a reader starting here misses nothing committed later."""
    return Cursor(int(await sql.fetch_val(db, _BOUNDARY)), 0)


async def read_after(db: Database, tenant: str, after: Cursor, *, limit: int = READ_BATCH) -> Batch:
    """The tenant's changes after `after`, oldest first, from at most `limit` rows (those of deleted jobs are
    skipped), and the cursor to read on from: the last row's, or with fewer than `limit`, the boundary when that is
    later."""
    values = {"tenant": tenant, "xid": after.xid, "seq": after.id, "limit": limit}
    read = _decode_read(await sql.fetch_val(db, _READ, values))
    high = after if read.last is None else Cursor(*read.last)
    full = read.rows == limit
    if not full:
        # Every row before the boundary is final, and read: nothing can appear behind it any more.
        high = max(high, Cursor(read.xmin, 0))
    return Batch([Change(Cursor(r.xid, r.seq), r) for r in read.changes], high, full)


_DELETE_OLD = """
WITH gone AS (
    DELETE FROM tenant_events WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM tenant_events WHERE created_at < now() - make_interval(secs => :keep)
         ORDER BY created_at LIMIT :batch))
    RETURNING 1
)
SELECT count(*) FROM gone
"""


async def delete_old(db: Database, *, batch: int, keep_s: float = KEEP_S) -> int:
    """Drop one batch of changes older than `keep_s`, oldest first: retention's step for the feed."""
    return int(await sql.fetch_val(db, _DELETE_OLD, {"batch": batch, "keep": keep_s}))
