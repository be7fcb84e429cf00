"""Every SQL statement on jobs and their events but the sweep's (worker/sweep.py), the heartbeat's
(worker/heartbeat.py) and the wake of jobs waiting for a slot (worker/capacity.py). Each state change is one guarded
UPDATE.

A statement's WHERE clause, not hope, keeps a terminal job terminal; an attempt's writes (heartbeat, finish,
interrupt, log lines) are fenced by its attempt number as well, so a late write from a superseded attempt changes
nothing. A cancel asked through the API is guarded by status and tenant: it ends a queued job, and only marks a
running one, whose own attempt then ends it. Every change appends
its event in the same statement (a data-modifying CTE), numbered by `jobs.event_seq`, which the
row lock serialises. All times come from the database clock.

A change goes through `Jobs`, which rings the followers' doorbell (worker/events.py's Notifier) for the jobs the
statement changed once it has committed: a change nobody announces is found only by the followers' next poll.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from databases import Database

from worker import sql
from worker.database import storable
from worker.events import Notifier
from worker.job import CANCELLED, TERMINAL, Error, Progress, Status, allowed_from
from worker.status import insert_sql as status_event

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Jobs:
    """The jobs table as every change to it goes: a statement on PostgreSQL, then the doorbell for the jobs it
    changed. Reads take the Database alone."""

    db: Database
    notifier: Notifier

    def changed(self, job_ids: Iterable[UUID]) -> None:
        for job_id in job_ids:
            self.notifier.notify(job_id)


_COLUMNS = (
    "id, type, status, input, progress, attempt, max_attempts, timeout_s, result, result_purged_at, error,"
    " callback_url, metadata, created_at, started_at, finished_at, expires_at, retry_of, run_at, priority,"
    " concurrency_key, workflow_id, step, parent_id, tenant_id, traceparent, result_size"
)
COLUMNS = _COLUMNS  # what a JobRow reads, for the queries of other modules (worker/dashboard.py)


class JobRow(msgspec.Struct, frozen=True, kw_only=True):
    """A jobs row as the API shows it."""

    id: UUID
    type: str
    status: Status
    input: str
    progress: str
    attempt: int
    max_attempts: int
    timeout_s: int
    result: str | None
    result_purged_at: datetime | None
    error: str | None
    callback_url: str | None
    metadata: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime
    retry_of: UUID | None = None
    run_at: datetime | None = None
    priority: int = 0
    concurrency_key: str | None = None
    workflow_id: UUID | None = None
    step: str | None = None
    parent_id: UUID | None = None
    tenant_id: str = ""  # not part of the Job: the API answers within one tenant, an operator across them
    traceparent: str | None = None  # nor this: the trace its submit began (worker/tracing.py)
    result_size: int | None = None  # a result in the blob store (worker/blobs.py): its size; `result` is NULL

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def _row(record: Any) -> JobRow:
    return msgspec.convert(dict(record), JobRow)


# -- submit -----------------------------------------------------------------------------------------

_INSERT = f"""
WITH job AS (
    INSERT INTO jobs (id, tenant_id, type, input, max_attempts, timeout_s, retry_safe, callback_url, metadata,
                      expires_at, dispatched_at, event_seq, idempotency_key, request_hash, retry_of, run_at,
                      next_run_at, priority, concurrency_key, workflow_id, step, item, upstream, parent_id, spawn_key,
                      traceparent)
    SELECT id, tenant_id, type, input, max_attempts, timeout_s, retry_safe, callback_url, metadata,
           -- a job asked to start later is kept that much longer: its time to live counts from its start
           greatest(run_at, now()) + make_interval(secs => ttl_s), now(), 1, idempotency_key, request_hash,
           retry_of, run_at, greatest(run_at, now()), priority, concurrency_key, workflow_id, step, item, upstream,
           parent_id, spawn_key, traceparent
      FROM unnest(CAST(:ids AS uuid[]), CAST(:tenants AS text[]), CAST(:types AS text[]), CAST(:inputs AS jsonb[]),
                  CAST(:max_attempts AS int[]), CAST(:timeouts AS int[]), CAST(:retry_safe AS bool[]),
                  CAST(:callback_urls AS text[]), CAST(:metadata AS jsonb[]), CAST(:ttls AS float8[]),
                  CAST(:idempotency_keys AS text[]), CAST(:request_hashes AS bytea[]), CAST(:retry_of AS uuid[]),
                  CAST(:run_at AS timestamptz[]), CAST(:priorities AS int[]), CAST(:concurrency_keys AS text[]),
                  CAST(:workflows AS uuid[]), CAST(:steps AS text[]), CAST(:items AS int[]),
                  CAST(:upstreams AS jsonb[]), CAST(:parents AS uuid[]), CAST(:spawn_keys AS text[]),
                  CAST(:traceparents AS text[]))
           AS new(id, tenant_id, type, input, max_attempts, timeout_s, retry_safe, callback_url, metadata, ttl_s,
                  idempotency_key, request_hash, retry_of, run_at, priority, concurrency_key, workflow_id, step,
                  item, upstream, parent_id, spawn_key, traceparent)
    -- an Idempotency-Key the tenant already used (or another job of the same batch uses), or a spawn key its parent
    -- already used: no row, no event; the caller finds the existing job
    ON CONFLICT DO NOTHING
    RETURNING *
), slot AS (  -- the row a claim locks and counts for the key (worker/claim.py)
    INSERT INTO concurrency_slots (type, key)
    SELECT DISTINCT type, concurrency_key FROM job WHERE concurrency_key IS NOT NULL
    ON CONFLICT DO NOTHING
), event AS ({status_event("job")})
SELECT {_COLUMNS} FROM job
"""


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job to insert, queued and marked dispatched: the caller enqueues it next (or calls `undispatch`)."""

    id: UUID
    tenant: str
    type: str
    input: bytes  # JSON
    max_attempts: int
    timeout_s: int
    retry_safe: bool
    callback_url: str | None
    metadata: bytes  # JSON
    ttl_s: float
    idempotency_key: str | None = None
    request_hash: bytes | None = None
    retry_of: UUID | None = None  # the failed, cancelled or expired job this one retries
    run_at: datetime | None = None  # not before then
    priority: int = 0  # -10..10: among due jobs, higher first
    concurrency_key: str | None = None  # shares its type's `concurrency` limit with the jobs of the same key
    workflow_id: UUID | None = None  # a step's job (worker/workflows.py): `step`, its `item` in a map, `upstream`
    step: str | None = None
    item: int | None = None
    upstream: bytes | None = None  # JSON: ctx.upstream
    parent_id: UUID | None = None  # spawned by that job's code (worker/spawn.py), under `spawn_key`
    spawn_key: str | None = None
    traceparent: str | None = None  # the trace it joins (worker/tracing.py); None: tracing is off


async def insert_jobs(db: Database, jobs: Sequence[NewJob]) -> list[JobRow | None]:
    """Insert `jobs` in one statement. None for a job whose tenant already has one with its `idempotency_key`
    (see `find_idempotent`), which includes an earlier job of the same batch, or whose parent has a child with its
    `spawn_key`."""
    values = {
        "ids": [j.id for j in jobs],
        "tenants": [j.tenant for j in jobs],
        "types": [j.type for j in jobs],
        "inputs": [j.input.decode() for j in jobs],
        "max_attempts": [j.max_attempts for j in jobs],
        "timeouts": [j.timeout_s for j in jobs],
        "retry_safe": [j.retry_safe for j in jobs],
        "callback_urls": [j.callback_url for j in jobs],
        "metadata": [j.metadata.decode() for j in jobs],
        "ttls": [j.ttl_s for j in jobs],
        "idempotency_keys": [j.idempotency_key for j in jobs],
        "request_hashes": [j.request_hash for j in jobs],
        "retry_of": [j.retry_of for j in jobs],
        "run_at": [j.run_at for j in jobs],
        "priorities": [j.priority for j in jobs],
        "concurrency_keys": [j.concurrency_key for j in jobs],
        "workflows": [j.workflow_id for j in jobs],
        "steps": [j.step for j in jobs],
        "items": [j.item for j in jobs],
        "upstreams": [None if j.upstream is None else j.upstream.decode() for j in jobs],
        "parents": [j.parent_id for j in jobs],
        "spawn_keys": [j.spawn_key for j in jobs],
        "traceparents": [j.traceparent for j in jobs],
    }
    rows = {row.id: row for row in map(_row, await sql.fetch_all(db, _INSERT, values))}
    return [rows.pop(j.id, None) for j in jobs]


_FIND_IDEMPOTENT = f"""
SELECT {_COLUMNS}, request_hash, created_at < now() - make_interval(secs => :window) AS expired
  FROM jobs WHERE tenant_id = :tenant AND idempotency_key = :key
"""


async def find_idempotent(
    db: Database, tenant: str, key: str, *, window_s: float
) -> tuple[JobRow, bytes | None, bool] | None:
    """The job `key` made for `tenant`: (row, its request hash, whether the key is past `window_s`)."""
    record = await sql.fetch_one(db, _FIND_IDEMPOTENT, {"tenant": tenant, "key": key, "window": window_s})
    if record is None:
        return None
    request_hash = record["request_hash"]
    return _row(record), None if request_hash is None else bytes(request_hash), bool(record["expired"])


_RELEASE_IDEMPOTENT = "UPDATE jobs SET idempotency_key = NULL WHERE id = :id AND idempotency_key = :key"


async def release_idempotency_key(db: Database, job_id: UUID, key: str) -> None:
    """Free an expired key for a new job; the old job stays, it just no longer answers to the key."""
    await sql.execute(db, _RELEASE_IDEMPOTENT, {"id": job_id, "key": key})


_UNDISPATCH = """
UPDATE jobs SET dispatched_at = NULL
  FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[])) AS w(id, attempt)
 WHERE jobs.id = w.id AND jobs.attempt = w.attempt AND jobs.status = 'queued'
"""


async def undispatch(db: Database, job_id: UUID, attempt: int) -> None:
    """Redis did not take the job: leave it to the sweep's next pass."""
    await undispatch_many(db, [(job_id, attempt)])


async def undispatch_many(db: Database, attempts: Sequence[tuple[UUID, int]]) -> None:
    """`undispatch` for each `(job_id, attempt)`, in one statement."""
    values = {"ids": [job_id for job_id, _ in attempts], "attempts": [attempt for _, attempt in attempts]}
    await sql.execute(db, _UNDISPATCH, values)


# -- reads ------------------------------------------------------------------------------------------

_GET = f"SELECT {_COLUMNS} FROM jobs WHERE id = :id AND tenant_id = :tenant"
_GET_ANY = f"SELECT {_COLUMNS} FROM jobs WHERE id = :id"


async def get_job(db: Database, tenant: str | None, job_id: UUID) -> JobRow | None:
    """The job of `tenant`; with None (an operator's `outlast jobs`), of whichever tenant it belongs to."""
    if tenant is None:
        record = await sql.fetch_one(db, _GET_ANY, {"id": job_id})
    else:
        record = await sql.fetch_one(db, _GET, {"id": job_id, "tenant": tenant})
    return None if record is None else _row(record)


_RETRIED_AS = f"""
SELECT {_COLUMNS} FROM jobs
 WHERE workflow_id = :workflow AND retry_of = :id AND tenant_id = :tenant ORDER BY id DESC LIMIT 1
"""


async def retried_as(db: Database, tenant: str, workflow_id: UUID, job_id: UUID) -> JobRow | None:
    """The job a workflow's resume made from `job_id` (the latest, should it have been resumed more than once)."""
    record = await sql.fetch_one(db, _RETRIED_AS, {"workflow": workflow_id, "id": job_id, "tenant": tenant})
    return None if record is None else _row(record)


async def list_jobs(
    db: Database,
    tenant: str | None,
    *,
    limit: int,
    status: Status | None = None,
    type: str | None = None,
    before: UUID | None = None,
) -> list[JobRow]:
    """The tenant's jobs (None: every tenant's), newest first (v7 ids sort by creation), `before` an id for the
    next page."""
    where = ["TRUE"]
    values: dict[str, Any] = {"limit": limit}
    for column, value in (("tenant_id", tenant), ("status", status), ("type", type)):
        if value is not None:
            where.append(f"{column} = :{column}")
            values[column] = value
    if before is not None:
        where.append("id < :before")
        values["before"] = before
    query = f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"
    return [_row(r) for r in await sql.fetch_all(db, query, values)]


# -- one attempt: finish (its claim is worker/claim.py) ---------------------------------------------


_FINISH = f"""
WITH wanted AS (  -- a pair given twice moves as its first place says; in id order, as the claims are
    SELECT DISTINCT ON (id, attempt) *
      FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]), CAST(:targets AS text[]),
                  CAST(:allowed AS text[]), CAST(:results AS jsonb[]), CAST(:errors AS jsonb[]),
                  CAST(:progresses AS jsonb[]), CAST(:delays AS float8[]), CAST(:result_sizes AS bigint[]))
           WITH ORDINALITY AS w(id, attempt, target, allowed, result, error, progress, delay, result_size, place)
     ORDER BY id, attempt, place
), moved AS (
    UPDATE jobs
       SET status = w.target,
           result = w.result, result_size = w.result_size,
           -- a retry's error lives in its status event only: `error` is for jobs that ended
           error = CASE WHEN w.target = 'queued' THEN NULL ELSE w.error END,
           progress = COALESCE(w.progress, jobs.progress),
           finished_at = CASE WHEN w.target = ANY(CAST(:terminal AS text[])) THEN now() END,
           next_run_at = now() + make_interval(secs => w.delay),
           dispatched_at = CASE WHEN w.target = 'queued' THEN now() END,
           lease_owner = NULL, lease_expires_at = NULL,
           event_seq = event_seq + 1
      FROM wanted w
     WHERE jobs.id = w.id AND jobs.attempt = w.attempt AND jobs.status = ANY(string_to_array(w.allowed, ','))
    RETURNING jobs.*, w.error AS attempt_error
), event AS ({status_event("moved", error="attempt_error")})
SELECT id, attempt FROM moved
"""


class Finish(msgspec.Struct, frozen=True):
    """Move running attempt `attempt` of a job to `to`: terminal, or `queued` for a retry in `retry_in_s`."""

    job_id: UUID
    attempt: int
    to: Status
    result: bytes | None = None
    error: Error | None = None
    progress: Progress | None = None
    retry_in_s: float = 0.0
    result_size: int | None = None  # the result is in the blob store (worker/blobs.py), this large; `result` is None


async def finish_many(jobs: Jobs, finishes: Sequence[Finish]) -> list[bool]:
    """Each of `finishes`, in one statement. False: someone won first (a pair given twice moves once).

    A retry is marked dispatched: the caller enqueues it with a delay, and the sweep covers a lost enqueue.
    """
    values = {
        "ids": [f.job_id for f in finishes],
        "attempts": [f.attempt for f in finishes],
        "targets": [f.to for f in finishes],
        "allowed": [",".join(allowed_from(f.to)) for f in finishes],
        "results": [None if f.result is None else f.result.decode() for f in finishes],
        "errors": [None if f.error is None else storable(f.error) for f in finishes],
        "progresses": [None if f.progress is None else storable(f.progress) for f in finishes],
        "delays": [f.retry_in_s for f in finishes],
        "result_sizes": [f.result_size for f in finishes],
        "terminal": sorted(TERMINAL),
    }
    moved = {(r["id"], r["attempt"]) for r in await sql.fetch_all(jobs.db, _FINISH, values)}
    jobs.changed(job_id for job_id, _ in moved)
    answers = []
    for f in finishes:
        answers.append((f.job_id, f.attempt) in moved)
        moved.discard((f.job_id, f.attempt))
    return answers


async def finish(
    jobs: Jobs,
    job_id: UUID,
    attempt: int,
    to: Status,
    *,
    result: bytes | None = None,
    error: Error | None = None,
    progress: Progress | None = None,
    retry_in_s: float = 0.0,
) -> bool:
    """Move a running attempt to `to` (terminal, or `queued` for a retry in `retry_in_s`). False: someone won first."""
    return (await finish_many(jobs, [Finish(job_id, attempt, to, result, error, progress, retry_in_s)]))[0]


# -- cancel and shutdown ----------------------------------------------------------------------------

CANCELLED_JSON = _encode(CANCELLED).decode()  # the error a cancelled job ends with, as :cancelled
_INTERRUPTED = _encode(Error("interrupted", "the worker shut down before the job finished", False)).decode()

# A cancel, over `jobs`: a running job is asked to stop; a queued one has no task to interrupt, so it ends here.
# `:cancelled` is the error it ends with. Its status event: status_event("moved WHERE status = 'cancelled'").
CANCEL_SET_SQL = """
       SET cancel_requested_at = COALESCE(cancel_requested_at, now()),
           status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
           error = CASE WHEN status = 'queued' THEN CAST(:cancelled AS jsonb) ELSE error END,
           finished_at = CASE WHEN status = 'queued' THEN now() END,
           event_seq = event_seq + CASE WHEN status = 'queued' THEN 1 ELSE 0 END"""

_REQUEST_CANCEL = f"""
WITH moved AS (
    UPDATE jobs{CANCEL_SET_SQL}
     WHERE id = :id AND tenant_id = :tenant AND status IN ('queued', 'running')
    RETURNING *
), event AS ({status_event("moved WHERE status = 'cancelled'")})
SELECT {_COLUMNS} FROM moved
"""


async def request_cancel(jobs: Jobs, tenant: str, job_id: UUID) -> JobRow | None:
    """Cancel a queued job at once, or ask a running one to stop. None: unknown, or already done."""
    record = await sql.fetch_one(
        jobs.db, _REQUEST_CANCEL, {"id": job_id, "tenant": tenant, "cancelled": CANCELLED_JSON}
    )
    if record is None:
        return None
    row = _row(record)
    if row.status == "cancelled":  # ended here; a running one is told by its abort or heartbeat, then ends itself
        jobs.changed([row.id])
    return row


_CANCEL_ASKED = """
SELECT cancel_requested_at IS NOT NULL FROM jobs WHERE id = :id AND attempt = :attempt AND status = 'running'
"""


async def cancel_requested(db: Database, job_id: UUID, attempt: int) -> bool:
    return bool(await sql.fetch_val(db, _CANCEL_ASKED, {"id": job_id, "attempt": attempt}))


_INTERRUPT = f"""
WITH moved AS (
    UPDATE jobs
       SET status = CASE WHEN retry_safe OR NOT :ran THEN 'queued' ELSE 'failed' END,
           interrupted = interrupted + CASE WHEN retry_safe OR NOT :ran THEN 1 ELSE 0 END,
           error = CASE WHEN retry_safe OR NOT :ran THEN NULL ELSE CAST(:interrupted AS jsonb) END,
           finished_at = CASE WHEN retry_safe OR NOT :ran THEN NULL ELSE now() END,
           next_run_at = now(), dispatched_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
           event_seq = event_seq + 1
     WHERE id = :id AND attempt = :attempt AND status = 'running'
    RETURNING *
), event AS ({status_event("moved")})
SELECT status FROM moved
"""


async def interrupt(jobs: Jobs, job_id: UUID, attempt: int, *, ran: bool = True) -> Status | None:
    """The worker is shutting down mid-attempt: hand a retry-safe job back without counting the attempt,
    end any other `failed` with `interrupted`. An attempt none of whose code `ran` goes back whatever its type.
    None: the attempt was no longer current."""
    values = {"id": job_id, "attempt": attempt, "interrupted": _INTERRUPTED, "ran": ran}
    status: Status | None = await sql.fetch_val(jobs.db, _INTERRUPT, values)
    if status is not None:
        jobs.changed([job_id])
    return status


_PING = "SELECT 1"


async def ping(db: Database) -> None:
    await sql.fetch_val(db, _PING)
