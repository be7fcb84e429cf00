"""Children that a job's code spawns, and a parent that waits for them as a row.

`await ctx.spawn(type, input, key=...)` makes a child job in the parent's tenant, `parent_id` naming the parent. The
key makes it idempotent across the parent's attempts: a unique index on `(parent_id, spawn_key)`, not a check in
Python, decides, so a parent that crashed after spawning and runs again gets the same children back.

`return ctx.wait_for_children()` ends the parent's run without ending the job: it goes back to `queued`, `waiting`,
due never, holding no worker slot, until its last live child has ended. Then it is due at once and its code runs
again from the top, with `ctx.children` holding every child's outcome by key. That run is not counted as an
attempt, and a job waits at most MAX_WAITS times. Whoever ends a child asks `resume` for its parent right after its
own commit; the sweep asks for every waiting parent, which covers a child ended elsewhere (a cancel, an expiry) and
a parent that began waiting as its last child ended.

A parent that ends failed, cancelled or expired takes its live children with it (`cascade`, the sweep's): queued
ones end `cancelled`, running ones are asked to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final
from uuid import UUID

import msgspec
from databases import Database
from uuid_utils.compat import uuid7

from worker import database, sql, store, tracing
from worker.deps import Deps
from worker.job import Child, Error, JobError, JobType, Progress
from worker.queue import Bell, enqueue_many
from worker.status import insert_sql as status_event

MAX_CHILDREN: Final = 10_000  # spawns in one run of a job's code
MAX_WAITS: Final = 100  # times one job may wait for its children
MAX_KEY_CHARS: Final = 200
_encode = msgspec.json.Encoder().encode


class SpawnError(JobError):
    """A spawn that can never succeed (an unknown type, an input its schema refuses, too many children): the parent
    fails with it, since no later attempt would do better."""

    type = "invalid_spawn"
    retryable = False


class Superseded(JobError):
    """The attempt that spawned is no longer the job's current one (it was rescued, or the job ended): it makes
    nothing, and its own finish will change nothing either."""

    type = "superseded"
    retryable = False


# FOR SHARE: a rescue, a wait or the finish of this attempt waits for the child's commit, so a child is never made by
# an attempt that was superseded between this check and the insert.
_CURRENT = """
SELECT tenant_id, priority FROM jobs WHERE id = :id AND attempt = :attempt AND status = 'running' FOR SHARE
"""
_EXISTING = "SELECT id FROM jobs WHERE parent_id = :parent AND spawn_key = :key"


async def spawn(
    deps: Deps,
    job_types: Mapping[str, JobType],
    parent: tuple[UUID, int],
    type: str,
    input: Any,
    *,
    key: str,
    metadata: Mapping[str, Any] | None = None,
) -> UUID:
    """The child of attempt `parent` = (job id, attempt) under `key`: made and rung now, or the one made before."""
    job_type = job_types.get(type)
    if job_type is None:
        raise SpawnError(f"spawn: unknown job type {type!r}; known types: {', '.join(sorted(job_types))}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise SpawnError(f"spawn: key must be 1 to {MAX_KEY_CHARS} characters")
    try:
        value = job_type.decoder.decode(_encode(input))
    except (msgspec.ValidationError, TypeError) as exc:
        raise SpawnError(f"spawn {type}: the input fails its schema: {exc}") from None
    encoded, meta = _encode(value), _encode(dict(metadata or {}))
    if database.has_nul(encoded) or database.has_nul(meta):
        raise SpawnError(f"spawn {type}: {database.NUL_MSG}")
    parent_id, attempt = parent
    db, config = deps.db, deps.config
    async with db.transaction():
        current = await sql.fetch_one(db, _CURRENT, {"id": parent_id, "attempt": attempt})
        if current is None:
            raise Superseded(f"attempt {attempt} of job {parent_id} is no longer running")
        child = store.NewJob(
            id=uuid7(),
            tenant=current["tenant_id"],
            type=job_type.name,
            input=encoded,
            max_attempts=job_type.max_attempts or config.default_max_attempts,
            timeout_s=min(job_type.timeout_s, config.max_timeout_s),
            retry_safe=job_type.retry_safe,
            callback_url=None,
            metadata=meta,
            ttl_s=config.job_ttl_s,
            priority=current["priority"],  # as urgent as the work it is part of
            parent_id=parent_id,
            spawn_key=key,
            traceparent=tracing.traceparent(),  # the spawning attempt's span: the child's attempts join its trace
        )
        (row,) = await store.insert_jobs(db, [child])
        if row is None:  # spawned before, by this attempt or an earlier one
            existing: UUID = await sql.fetch_val(db, _EXISTING, {"parent": parent_id, "key": key})
            return existing
    bell = Bell(row.id, row.attempt, row.priority, row.tenant_id)
    if not await enqueue_many(deps.redis, [bell], step_s=config.priority_step_s):
        await store.undispatch(db, row.id, row.attempt)  # the sweep dispatches it
    return row.id


_WAIT = f"""
WITH moved AS (
    UPDATE jobs
       SET status = 'queued', waiting = true, waits = waits + 1,
           interrupted = interrupted + 1,  -- a run that ends waiting is not an attempt that failed
           progress = COALESCE(CAST(:progress AS jsonb), progress),
           next_run_at = 'infinity', dispatched_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
           -- its children each have the deployment's time to live: so has the parent that waits for them
           expires_at = greatest(expires_at, now() + make_interval(secs => :ttl)),
           event_seq = event_seq + 1
     WHERE id = :id AND attempt = :attempt AND status = 'running' AND waits < :max_waits
    RETURNING *
), event AS ({status_event("moved")})
SELECT id FROM moved
"""


async def wait(jobs: store.Jobs, job_id: UUID, attempt: int, *, progress: Progress | None, ttl_s: float) -> bool:
    """Attempt `attempt` ends waiting for the job's children. False: it was no longer current, or has waited
    MAX_WAITS times already (the caller tells which by `waits`)."""
    values = {
        "id": job_id,
        "attempt": attempt,
        "progress": None if progress is None else database.storable(progress),
        "ttl": ttl_s,
        "max_waits": MAX_WAITS,
    }
    moved = await sql.fetch_val(jobs.db, _WAIT, values) is not None
    if moved:
        jobs.changed([job_id])
    return moved


# Locked without SKIP LOCKED: a parent whose own wait has not committed yet is waited for, then looked at again, so
# the child that ended meanwhile is not missed (its end committed before this statement began).
_RESUME = """
WITH ready AS (
    SELECT p.id FROM jobs p
     WHERE p.waiting AND p.status = 'queued'
       AND (CAST(:ids AS uuid[]) IS NULL OR p.id = ANY(CAST(:ids AS uuid[])))
       AND NOT EXISTS (SELECT 1 FROM jobs c WHERE c.parent_id = p.id AND c.status IN ('queued', 'running'))
     ORDER BY p.id LIMIT :batch FOR NO KEY UPDATE
)
UPDATE jobs j SET waiting = false, next_run_at = now(), dispatched_at = now()
  FROM ready WHERE j.id = ready.id AND j.waiting AND j.status = 'queued'
RETURNING j.id, j.attempt, j.priority, j.tenant_id
"""


async def resume(db: Database, parent_ids: Sequence[UUID] | None, *, batch: int) -> list[Bell]:
    """The waiting parents among `parent_ids` (None: any, up to `batch`) that have no live child any more, due now and
    marked dispatched: the caller rings the bells."""
    ids = None if parent_ids is None else list(parent_ids)
    records = await sql.fetch_all(db, _RESUME, {"ids": ids, "batch": batch})
    return [Bell(r["id"], r["attempt"], r["priority"], r["tenant_id"]) for r in records]


_CHILDREN = """
SELECT spawn_key, id, type, status, result, error FROM jobs WHERE parent_id = :id ORDER BY id
"""
_child = msgspec.json.Decoder(Error)


async def children(db: Database, parent_id: UUID) -> dict[str, Child]:
    """Every child of the job by key, in the order they were spawned."""
    return {
        r["spawn_key"]: Child(
            r["id"],
            r["type"],
            r["status"],
            None if r["result"] is None else msgspec.json.decode(r["result"]),
            None if r["error"] is None else _child.decode(r["error"]),
        )
        for r in await sql.fetch_all(db, _CHILDREN, {"id": parent_id})
    }


_CASCADE = """
WITH orphans AS (
    SELECT c.id FROM jobs c JOIN jobs p ON p.id = c.parent_id
     WHERE c.parent_id IS NOT NULL AND c.status IN ('queued', 'running') AND c.cancel_requested_at IS NULL
       AND p.status IN ('failed', 'cancelled', 'expired')
     LIMIT :batch FOR NO KEY UPDATE OF c SKIP LOCKED
)
UPDATE jobs c SET cancel_requested_at = now() FROM orphans o WHERE c.id = o.id
RETURNING c.id, c.attempt, c.status
"""


async def cascade(db: Database, *, batch: int) -> list[tuple[UUID, int]]:
    """Mark the live children of parents that ended failed, cancelled or expired as asked to cancel: the sweep's
    `cancel_requeued` ends the queued ones, a running one's heartbeat stops it. Returns the running ones, for an
    abort that stops them sooner."""
    rows = await sql.fetch_all(db, _CASCADE, {"batch": batch})
    return [(r["id"], r["attempt"]) for r in rows if r["status"] == "running"]
