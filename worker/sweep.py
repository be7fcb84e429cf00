"""The sweep: a pass every few seconds on every worker: rescue, expire, cancel, dispatch, retain; its statements and
its loop. Each step is a guarded batch with SKIP LOCKED, so concurrent passes never collide.

It runs as the worker's own task, not as an arq cron job: a cron job needs a free job slot, and a worker whose
slots are all taken by long jobs would never rescue anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from uuid import UUID

import msgspec
from databases import Database

from worker import database, metrics, retention, spawn, sql, workflows
from worker.capacity import CAP_SQL, KEY_FULL_SQL, Capacity, ensure_buckets, leave, limit_values, refresh
from worker.config import Config
from worker.deps import Deps
from worker.job import Error
from worker.queue import Bell, forget, in_progress_mark_s, request_abort_many, ring_again
from worker.retention import NOTHING, Cadence, Retained
from worker.retry import envelope_sql
from worker.status import insert_sql as status_event
from worker.store import CANCELLED_JSON, Jobs

log = logging.getLogger("outlast.sweep")
_encode = msgspec.json.Encoder().encode

_WORKER_LOST = _encode(Error("worker_lost", "the worker running this job stopped responding", False)).decode()
_EXPIRED = _encode(Error("expired", "the job did not finish before its expires_at", False)).decode()

_RESCUE = f"""
WITH lost AS (
    -- a crash counts as an attempt, so a job that kills its worker can't loop forever
    SELECT id, retry_safe AND attempt - interrupted < max_attempts AS again
      FROM jobs WHERE status = 'running' AND lease_expires_at < now()
     ORDER BY lease_expires_at LIMIT :batch FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE jobs j
       SET status = CASE WHEN lost.again THEN 'queued' ELSE 'failed' END,
           error = CASE WHEN lost.again THEN NULL ELSE CAST(:worker_lost AS jsonb) END,
           finished_at = CASE WHEN lost.again THEN NULL ELSE now() END,
           next_run_at = now() + make_interval(secs => random() * {envelope_sql("j.attempt - j.interrupted")}),
           dispatched_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
           event_seq = j.event_seq + 1
      FROM lost WHERE j.id = lost.id
    RETURNING j.*
), event AS ({status_event("moved")})
SELECT id, attempt FROM moved
"""

_EXPIRE = f"""
WITH late AS (
    SELECT id FROM jobs WHERE status IN ('queued', 'running') AND expires_at <= now()
     ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE jobs j
       SET status = 'expired', error = CAST(:expired AS jsonb), finished_at = now(),
           lease_owner = NULL, lease_expires_at = NULL, event_seq = j.event_seq + 1
      FROM late WHERE j.id = late.id
    RETURNING j.*
), event AS ({status_event("moved")})
SELECT id FROM moved
"""

_CANCEL_QUEUED = f"""
WITH moved AS (
    UPDATE jobs SET status = 'cancelled', error = CAST(:cancelled AS jsonb), finished_at = now(),
           event_seq = event_seq + 1
     WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' AND cancel_requested_at IS NOT NULL
                     AND (CAST(:workflows AS uuid[]) IS NULL OR workflow_id = ANY(CAST(:workflows AS uuid[])))
                   LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING *
), event AS ({status_event("moved")})
SELECT id FROM moved
"""

_DUE = f"""
WITH due AS (
    SELECT id, dispatched_at IS NOT NULL AND dispatched_at < next_run_at AS promote FROM jobs
     WHERE status = 'queued' AND next_run_at <= now()
       AND (dispatched_at IS NULL OR dispatched_at < now() - make_interval(secs => :redispatch)
            -- rung with a delay and due now: rung again, its waiting message moves up to its priority's rank
            OR dispatched_at < next_run_at)
       -- not while its tenant is at its cap or its key at its limit: the claim would only turn it away again
       AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = jobs.tenant_id AND t.running >= {CAP_SQL})
       AND NOT {KEY_FULL_SQL}
     ORDER BY priority DESC, next_run_at, id LIMIT :batch FOR UPDATE SKIP LOCKED
)
UPDATE jobs j SET dispatched_at = now() FROM due WHERE j.id = due.id
RETURNING j.id, j.attempt, j.priority, j.tenant_id, due.promote
"""


# Which of the pass's steps have anything to do, in one statement: each EXISTS is its step's selection or wider (no
# locks, no caps, no batch), so a step it skips would have found nothing either. A pass runs from the first step with
# work on, every step after it included, since what one step changes is the next ones' work (a rescued job may be due
# at once, a cascade's marks are the cancel's, an ended child may wake its parent). Idle, a pass is this statement.
STEPS = ("rescue", "expire", "cascade", "cancel", "ready", "dispatch", "resume")
_WORK = """
SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'running' AND lease_expires_at < now()) AS rescue,
       EXISTS (SELECT 1 FROM jobs WHERE status IN ('queued', 'running') AND expires_at <= now()) AS expire,
       EXISTS (SELECT 1 FROM jobs c JOIN jobs p ON p.id = c.parent_id
                WHERE c.parent_id IS NOT NULL AND c.status IN ('queued', 'running') AND c.cancel_requested_at IS NULL
                  AND p.status IN ('failed', 'cancelled', 'expired')) AS cascade,
       EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND cancel_requested_at IS NOT NULL) AS cancel,
       EXISTS (SELECT 1 FROM workflow_steps WHERE status = 'ready') AS ready,
       EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND next_run_at <= now()) AS dispatch,
       EXISTS (SELECT 1 FROM jobs WHERE waiting AND status = 'queued') AS resume
"""


async def steps_to_run(db: Database) -> frozenset[str]:
    """The steps of STEPS this pass runs: from the first that has work on."""
    found = await sql.fetch_one(db, _WORK)
    assert found is not None  # one row, always
    first = next((i for i, step in enumerate(STEPS) if found[step]), len(STEPS))
    return frozenset(STEPS[first:])


async def rescue_lost(jobs: Jobs, *, batch: int, backoff_base_s: float, backoff_cap_s: float) -> list[tuple[UUID, int]]:
    """Running jobs whose lease expired: back to queued (retry-safe, attempts left) or failed `worker_lost`.
    Returns each rescued job with the attempt that was lost."""
    values = {"batch": batch, "worker_lost": _WORKER_LOST, "base": backoff_base_s, "cap": backoff_cap_s}
    lost = [(r["id"], r["attempt"]) for r in await sql.fetch_all(jobs.db, _RESCUE, values)]
    jobs.changed(job_id for job_id, _ in lost)
    return lost


async def expire_late(jobs: Jobs, *, batch: int) -> int:
    """Live jobs past `expires_at` end `expired`."""
    expired = [r["id"] for r in await sql.fetch_all(jobs.db, _EXPIRE, {"batch": batch, "expired": _EXPIRED})]
    jobs.changed(expired)
    return len(expired)


async def cancel_requeued(jobs: Jobs, *, batch: int, workflows: list[UUID] | None = None) -> int:
    """A cancel accepted while the job ran, and the job went back to queued anyway (its worker died and it was
    rescued, or a retry was booked), or a queued job of a workflow that failed: the claim refuses it, so it ends
    `cancelled` here (only those of `workflows`, when given)."""
    values = {"batch": batch, "cancelled": CANCELLED_JSON, "workflows": workflows}
    cancelled = [r["id"] for r in await sql.fetch_all(jobs.db, _CANCEL_QUEUED, values)]
    jobs.changed(cancelled)
    return len(cancelled)


async def take_due(
    db: Database, *, batch: int, redispatch_after_s: float, capacity: Capacity | None = None
) -> list[Bell]:
    """Queued, due jobs that Redis may not hold, or holds at a rank below theirs (and that have a slot free), marked
    dispatched now: the caller rings each."""
    values = {
        "batch": batch,
        "redispatch": redispatch_after_s,
        "default_cap": None if capacity is None else capacity.default_cap,
        **limit_values({} if capacity is None else capacity.limits),
    }
    records = await sql.fetch_all(db, _DUE, values)
    return [Bell(r["id"], r["attempt"], r["priority"], r["tenant_id"], promote=r["promote"]) for r in records]


@contextlib.asynccontextmanager
async def sweeping(deps: Deps, capacity: Capacity | None = None) -> AsyncIterator[None]:
    """Sweep every `sweep_interval_s` (the first pass at once) while the block runs, retaining as its Cadence says;
    with `capacity`, each pass also says this worker is alive and recomputes the tenants' default cap."""
    cadence = Cadence()

    async def loop() -> None:
        while True:
            try:
                retaining = cadence.due(time.monotonic())
                with metrics.sweep_seconds.time():
                    retained = await sweep_once(deps, capacity, retain=retaining)
                if retaining:
                    cadence.done(time.monotonic(), retained, deps.config.sweep_batch)
            except database.UNAVAILABLE as exc:
                log.warning("sweep skipped: database unavailable (%s)", exc)
            except Exception:
                log.exception("sweep failed; the next pass tries again")
            # Jitter, so that the workers of a deployment started together don't sweep in lockstep.
            await asyncio.sleep(deps.config.sweep_interval_s * random.uniform(0.8, 1.2))

    task = asyncio.create_task(loop(), name="outlast-sweep")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if capacity is not None:
            with contextlib.suppress(*database.UNAVAILABLE):
                await leave(deps.db, capacity.name)


def fresh_s(config: Config) -> float:
    """How recently a worker must have said it is alive for its slots to count."""
    return 3 * config.sweep_interval_s + config.lease_s


async def _alive(db: Database, capacity: Capacity, config: Config) -> None:
    """This worker's slots in `workers`, for the tenants' default cap: every third pass or so, which keeps it seen well
    within fresh_s; the rate buckets of its types every pass."""
    if capacity.refreshed_s_ago() >= fresh_s(config) / 3:
        await refresh(db, capacity, fresh_s=fresh_s(config))
    await ensure_buckets(db, capacity)


async def _to_ring(deps: Deps, steps: frozenset[str], capacity: Capacity | None) -> list[Bell]:
    """The pass's dispatch steps: the jobs of ready workflow steps, the due jobs, the resumed parents."""
    config, db, batch = deps.config, deps.db, deps.config.sweep_batch
    due: list[Bell] = []
    if "ready" in steps:
        # Steps a worker made ready and died before it started them; their jobs go out with the due ones below.
        due += await workflows.start_ready(db, None, ttl_s=config.job_ttl_s, batch=batch)
    if "dispatch" in steps:
        # After rescue, so a rescued job whose backoff is already over goes out in this same pass.
        due += await take_due(db, batch=batch, redispatch_after_s=config.redispatch_after_s, capacity=capacity)
    if "resume" in steps:
        # Parents whose last child ended without waking them (cancelled, expired, or as the parent began to wait).
        due += await spawn.resume(db, None, batch=batch)
    return due


async def sweep_once(deps: Deps, capacity: Capacity | None = None, *, retain: bool = True) -> Retained:
    """One pass, retention last unless told not to; what retention did (bench/retention.py counts it)."""
    config, db, batch = deps.config, deps.db, deps.config.sweep_batch
    if capacity is not None:
        await _alive(db, capacity, config)
    steps = await steps_to_run(db)
    lost: list[tuple[UUID, int]] = []
    if "rescue" in steps:
        lost = await rescue_lost(
            deps.jobs, batch=batch, backoff_base_s=config.backoff_base_s, backoff_cap_s=config.backoff_cap_s
        )
    rescued = len(lost)
    metrics.rescued.inc(rescued)  # at once: a kill later in the pass must not lose the count
    await forget(deps.redis, lost)
    expired = await expire_late(deps.jobs, batch=batch) if "expire" in steps else 0
    metrics.expired.inc(expired)
    # the live children of parents that ended otherwise than succeeded: marked first, so the queued end just below
    if "cascade" in steps and (running_orphans := await spawn.cascade(db, batch=batch)):
        await request_abort_many(deps.redis, running_orphans)
    cancelled = await cancel_requeued(deps.jobs, batch=batch) if "cancel" in steps else 0
    due = await _to_ring(deps, steps, capacity)
    # A claim commits within milliseconds of arq taking its message: a mark half a lease old is a dead worker's, and
    # clearing it then (not at a full lease) leaves a row that became due for redispatch no pass to wait out.
    mark_s, stale_after_s = in_progress_mark_s(config.max_timeout_s), config.lease_s / 2
    rung = await asyncio.gather(
        *(
            ring_again(deps.redis, bell, mark_s=mark_s, stale_after_s=stale_after_s, step_s=config.priority_step_s)
            for bell in due
        )
    )
    if due and not all(rung):
        log.warning("sweep: Redis unavailable; %d jobs wait for the next pass", rung.count(False))
    retained = await retention.retain(db, config) if retain else NOTHING
    if rescued or expired or cancelled or due:
        log.info("sweep: rescued %d, expired %d, cancelled %d, dispatched %d", rescued, expired, cancelled, len(due))
    if retained.deleted or retained.workflows:
        log.info("sweep: retention deleted %d jobs and %d workflows", retained.deleted, retained.workflows)
    return retained
