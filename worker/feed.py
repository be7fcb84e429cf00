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


class FeedJob(msgspec.Struct, frozen=True, kw_only=True):
    """A `job` event's data: the Job without its input and result, which may be large."""

    id: UUID
    type: str
    status: Status
    done: bool
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
    links: Links


class Change(NamedTuple):
    cursor: Cursor
    job: FeedJob


class Batch(NamedTuple):
    """One read: its changes, the cursor to read on from, and whether it was full (more is there already)."""

    changes: list[Change]
    high: Cursor
    full: bool


_READ = """
WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT CAST(snap.xmin AS text) AS xmin, CAST(c.xid AS text) AS xid, c.*
  FROM snap LEFT JOIN LATERAL (
    SELECT e.xid, e.id AS seq, j.id, j.type, j.status, j.progress, j.attempt, j.max_attempts, j.error, j.metadata,
           j.created_at, j.started_at, j.finished_at, j.retry_of, j.workflow_id, j.step, j.parent_id
      FROM tenant_events e JOIN jobs j ON j.id = e.job_id
     WHERE e.tenant_id = :tenant AND (e.xid, e.id) > (CAST(:xid AS xid8), :seq) AND e.xid < snap.xmin
     ORDER BY e.xid, e.id
     LIMIT :limit
  ) c ON true
 ORDER BY c.xid, c.seq
"""
_BOUNDARY = "SELECT CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text)"
_decode_progress = msgspec.json.Decoder(Progress).decode
_decode_error = msgspec.json.Decoder(Error).decode
_decode_any = msgspec.json.Decoder().decode


def _job(r: Any) -> FeedJob:
    return FeedJob(
        id=r["id"],
        type=r["type"],
        status=r["status"],
        done=r["status"] in TERMINAL,
        progress=_decode_progress(r["progress"]),
        attempt=r["attempt"],
        max_attempts=r["max_attempts"],
        error=None if r["error"] is None else _decode_error(r["error"]),
        metadata=_decode_any(r["metadata"]),
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        retry_of=r["retry_of"],
        workflow_id=r["workflow_id"],
        step=r["step"],
        parent_id=r["parent_id"],
        links=resource.links(r["id"]),
    )


async def boundary(db: Database) -> Cursor:
    """Where the final part of every feed ends now: a reader starting here misses nothing committed later."""
    return Cursor(int(await sql.fetch_val(db, _BOUNDARY)), 0)


async def read_after(db: Database, tenant: str, after: Cursor, *, limit: int = READ_BATCH) -> Batch:
    """The tenant's changes after `after`, oldest first, from at most `limit` rows (those of deleted jobs are
    skipped), and the cursor to read on from: the last change's, or with fewer than `limit`, the boundary when that
    is later."""
    values = {"tenant": tenant, "xid": after.xid, "seq": after.id, "limit": limit}
    rows = await sql.fetch_all(db, _READ, values)  # one row with only `xmin` when nothing is new
    found = [r for r in rows if r["seq"] is not None]
    latest: dict[UUID, Any] = {}
    for r in found:  # a job changed twice in the batch is shown once, where it changed last (and decoded once)
        latest.pop(r["id"], None)
        latest[r["id"]] = r
    high = Cursor(int(found[-1]["xid"]), found[-1]["seq"]) if found else after
    full = len(found) == limit
    if not full:
        # Every row before the boundary is final, and read: nothing can appear behind it any more.
        high = max(high, Cursor(int(rows[0]["xmin"]), 0))
    return Batch([Change(Cursor(int(r["xid"]), r["seq"]), _job(r)) for r in latest.values()], high, full)


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
