"""Retention, the sweep's last step: results, then whole jobs, then ended workflows past their retention, and
Idempotency-Keys past their window released. Not every pass: once a minute (RETAIN_EVERY_S), and at the very next
pass again while a pass finds a full batch, so a backlog still goes at a batch a pass.

Every statement takes one bounded batch, found through a partial index holding only the rows it is after
(migrations/0022), and commits on its own: a pass costs its batches however large the table, and holds its row
locks for milliseconds. A job's events, webhook deliveries and their attempts go with it by foreign-key cascade
(each child indexed by its job), and a deleted parent leaves its children standing (`parent_id` set NULL).
bench/retention.py measures passes over 1,000,000 jobs past retention.
"""

from __future__ import annotations

from dataclasses import dataclass

from databases import Database

from worker import blobs, feed, sql
from worker.capacity import forget_stale
from worker.config import Config

# Its statements (seven) find nothing on a table in steady state between passes seconds apart: a minute apart they
# cost an idle worker 0.12 a second instead of 1.4, and what is past retention waits a minute more at most.
RETAIN_EVERY_S = 60.0

# A workflow's results stay while it is kept: a resumed workflow's next steps read them as ctx.upstream.
# SKIP LOCKED here and below: two workers' passes take different batches instead of the second queueing on the
# first's row locks.
_PURGE_RESULTS = """
WITH purged AS (
    UPDATE jobs SET result = NULL, result_purged_at = now()
     WHERE id IN (SELECT id FROM jobs WHERE status = 'succeeded' AND result_purged_at IS NULL AND workflow_id IS NULL
                     AND finished_at < now() - make_interval(secs => :retention)
                   ORDER BY finished_at LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT count(*) FROM purged
"""
# A deleted job's blobs lose their job_id (ON DELETE SET NULL) in this statement, and worker/blobs.py's `retain`
# deletes them after it commits: a blob deleted before its row would leave a kept job pointing at nothing.
_DELETE_OLD = """
DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at < now() - make_interval(secs => :retention)
                                AND workflow_id IS NULL
                              ORDER BY finished_at LIMIT :batch FOR UPDATE SKIP LOCKED)
RETURNING id
"""
# A workflow's jobs go with it, as one statement per workflow: a 10,000-way map is one large delete, so few a pass.
_DELETE_OLD_WORKFLOWS = """
WITH gone AS (
    DELETE FROM workflows
     WHERE status <> 'running'  -- again here: a resume that committed meanwhile is seen once the row is locked
       AND id IN (SELECT id FROM workflows
                   WHERE status <> 'running' AND finished_at < now() - make_interval(secs => :retention)
                   ORDER BY finished_at LIMIT :batch)
    RETURNING 1
)
SELECT count(*) FROM gone
"""
WORKFLOWS_PER_PASS = 5
# A key past its window answers no replay (the submit that meets it releases it, server/submit.py); released here
# too, so a job kept for 30 days does not hold its key in the unique index for 29 of them.
_RELEASE_KEYS = """
WITH released AS (
    UPDATE jobs SET idempotency_key = NULL
     WHERE id IN (SELECT id FROM jobs WHERE idempotency_key IS NOT NULL
                     AND created_at < now() - make_interval(secs => :window)
                   ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT count(*) FROM released
"""


@dataclass(frozen=True)
class Retained:
    """What one pass did, row counts: at most the batch each (WORKFLOWS_PER_PASS for workflows)."""

    purged: int  # results dropped
    deleted: int  # jobs deleted, with their events and deliveries
    workflows: int  # ended workflows deleted whole
    released: int  # Idempotency-Keys freed
    feed: int = 0  # rows of the tenant feeds' log past a day (worker/feed.py)
    blobs: int = 0  # blobs of deleted jobs, old uploads and unfinished writes (worker/blobs.py)

    def full(self, batch: int) -> bool:
        """Some statement took all it may take in a pass: more is likely waiting."""
        return (
            batch in (self.purged, self.deleted, self.released, self.feed)
            or self.workflows >= WORKFLOWS_PER_PASS
            or self.blobs >= blobs.RETAIN_BATCH
        )


NOTHING = Retained(purged=0, deleted=0, workflows=0, released=0)  # a pass that did not retain


class Cadence:
    """When the sweep's next pass retains: its first, then RETAIN_EVERY_S after the last one that found less than a
    full batch, and the next pass whenever one found a full batch."""

    def __init__(self, every_s: float = RETAIN_EVERY_S) -> None:
        self.every_s = every_s
        self.next_at = float("-inf")

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def done(self, now: float, retained: Retained, batch: int) -> None:
        self.next_at = float("-inf") if retained.full(batch) else now + self.every_s


async def retain(db: Database, config: Config) -> Retained:
    """Drop results past their retention (410 from then on), then whole jobs past theirs, and ended workflows past
    theirs with all their jobs; release keys past `idempotency_ttl_s`."""
    batch = config.sweep_batch
    purged = await sql.fetch_val(db, _PURGE_RESULTS, {"batch": batch, "retention": config.result_retention_s})
    deleted = await sql.fetch_all(db, _DELETE_OLD, {"batch": batch, "retention": config.job_retention_s})
    values = {"batch": WORKFLOWS_PER_PASS, "retention": config.job_retention_s}
    workflows = await sql.fetch_val(db, _DELETE_OLD_WORKFLOWS, values)
    released = await sql.fetch_val(db, _RELEASE_KEYS, {"batch": batch, "window": config.idempotency_ttl_s})
    changes = await feed.delete_old(db, batch=batch)
    gone = await blobs.of(config, db).retain(retention_s=config.job_retention_s)
    await forget_stale(db, older_than_s=86_400)  # workers gone for a day: no one's slots
    return Retained(
        purged=purged, deleted=len(deleted), workflows=workflows, released=released, feed=changes, blobs=gone
    )
