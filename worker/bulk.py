"""Cancelling many jobs at once (POST /v1/jobs/cancel): one guarded UPDATE, as a single cancel (store.request_cancel)
is, over the tenant's live jobs that match a filter.

A queued job ends `cancelled` in the statement; a running one is marked, and told at once through arq's abort (its
heartbeat finds the mark otherwise), then ends itself. Rows are locked in id order, as batched claims lock theirs
(worker/store.py), and a deadlock PostgreSQL breaks anyway is retried.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
from arq.connections import ArqRedis

from worker import sql
from worker.job import Status
from worker.queue import request_abort_many
from worker.status import insert_sql as status_event
from worker.store import CANCEL_SET_SQL, CANCELLED_JSON, Jobs

MAX_CANCEL = 10_000  # jobs one call cancels at most: a caller with more calls again
_DEADLOCK_TRIES = 3

_CANCEL_MATCHING = f"""
WITH chosen AS (
    SELECT id FROM jobs
     WHERE tenant_id = :tenant AND status = ANY(CAST(:statuses AS text[]))
       -- a running job already asked to stop is not asked (nor counted) again
       AND (status = 'queued' OR cancel_requested_at IS NULL)
       AND (CAST(:type AS text) IS NULL OR type = CAST(:type AS text))
       AND metadata @> CAST(:metadata AS jsonb)
       AND (CAST(:workflow AS uuid) IS NULL OR workflow_id = CAST(:workflow AS uuid))
     ORDER BY id LIMIT :limit
       FOR UPDATE
), moved AS (
    UPDATE jobs{CANCEL_SET_SQL}
      FROM chosen
     WHERE jobs.id = chosen.id AND jobs.status IN ('queued', 'running')
    RETURNING jobs.*
), event AS ({status_event("moved WHERE status = 'cancelled'")})
SELECT id, status, attempt FROM moved
"""


async def cancel_matching(
    jobs: Jobs,
    redis: ArqRedis,
    tenant: str,
    *,
    status: Status | None = None,
    type: str | None = None,
    metadata: bytes = b"{}",
    workflow: UUID | None = None,
    limit: int = MAX_CANCEL,
) -> int:
    """Cancel up to `limit` of the tenant's live jobs with this status (queued or running; None: both), this type,
    `metadata` (JSON) contained in theirs, and of this workflow. Returns how many: ended, or asked to stop."""
    values: dict[str, Any] = {
        "tenant": tenant,
        "statuses": ["queued", "running"] if status is None else [status],
        "type": type,
        "metadata": metadata.decode(),
        "workflow": workflow,
        "limit": limit,
        "cancelled": CANCELLED_JSON,
    }
    for attempt in range(1, _DEADLOCK_TRIES + 1):
        try:
            records = await sql.fetch_all(jobs.db, _CANCEL_MATCHING, values)
            break
        except asyncpg.DeadlockDetectedError:
            if attempt == _DEADLOCK_TRIES:
                raise
    ended: list[UUID] = [r["id"] for r in records if r["status"] == "cancelled"]
    jobs.changed(ended)  # a running one is told by its abort or heartbeat, then ends itself, and tells its own
    running = [(r["id"], r["attempt"]) for r in records if r["status"] == "running"]
    if running:
        await request_abort_many(redis, running)
    return len(records)
