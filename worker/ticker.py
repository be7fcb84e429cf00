"""The ticker: each worker's task that turns schedules' ticks into jobs, and a trigger's job made at once.

One job per tick however many workers tick: a pass takes the due schedules with FOR UPDATE SKIP LOCKED, inserts
their jobs and advances them in one transaction, so a concurrent pass skips them and, once this one commits, finds
them no longer due. Each tick's job also carries the Idempotency-Key `schedule <id> <tick>`, so even a second
insert for the same tick makes nothing.

Ticks missed while nothing ran (every worker down, or a database outage) are not replayed as a burst: the pass that
finds a schedule late runs its latest tick at or before now, once, and books the first tick after now.

Jobs are made as a submit makes them (store.insert_jobs, marked dispatched), and their doorbells rung after the
commit; should Redis not take them, they are marked undispatched and the sweep rings for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from uuid_utils.compat import uuid7

from worker import database, notify, schedules, store
from worker.config import Config
from worker.deps import Deps
from worker.job import JobType
from worker.queue import Bell, enqueue_many

log = logging.getLogger("outlast.schedules")
_encode = msgspec.json.Encoder().encode
_MIN_SLEEP_S = 0.05  # a due schedule another ticker holds: look again soon, not in a tight loop


def tick_key(schedule_id: str, tick: datetime) -> str:
    """The Idempotency-Key of a tick's job. It holds spaces, which no client's key may (1 to 255 visible ASCII
    characters), so a client can never take one."""
    return f"schedule {schedule_id} {tick.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def job_of(row: schedules.ScheduleRow, job_type: JobType, config: Config, *, tick: datetime | None) -> store.NewJob:
    """The job a schedule makes: its type with the type's defaults, its input, and its metadata plus `schedule_id`
    (and, for a tick, `scheduled_for`) so that one can find a schedule's jobs."""
    metadata: dict[str, Any] = {**msgspec.json.decode(row.metadata), "schedule_id": row.id}
    if tick is not None:
        metadata["scheduled_for"] = tick.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return store.NewJob(
        id=uuid7(),
        tenant=row.tenant_id,
        type=job_type.name,
        input=row.input.encode(),
        max_attempts=job_type.max_attempts or config.default_max_attempts,
        timeout_s=min(job_type.timeout_s, config.max_timeout_s),
        retry_safe=job_type.retry_safe,
        callback_url=None,
        metadata=_encode(metadata),
        ttl_s=config.job_ttl_s,
        idempotency_key=None if tick is None else tick_key(row.id, tick),
    )


async def _ring(deps: Deps, made: Sequence[store.JobRow]) -> None:
    """A submit's doorbell: each job ranked by its priority (0) and fairly among tenants (worker/queue.py)."""
    bells = [Bell(row.id, row.attempt, 0, row.tenant_id) for row in made]
    if bells and not await enqueue_many(deps.redis, bells, step_s=deps.config.priority_step_s):
        await store.undispatch_many(deps.db, [(b.job_id, b.started) for b in bells])  # the rows are the outbox


async def tick(deps: Deps, job_types: Mapping[str, JobType], *, now: datetime | None = None) -> int:
    """One pass at `now` (the database's clock unless given): a job for each due schedule's latest due tick, each
    schedule advanced to its first tick after `now`. Returns how many schedules were due."""
    db, config = deps.db, deps.config
    moment = now or await schedules.now(db)
    async with db.transaction():
        due = await schedules.take_due(db, now=moment, batch=config.sweep_batch)
        ticks: list[tuple[schedules.ScheduleRow, datetime, datetime]] = []
        jobs: list[store.NewJob | None] = []
        for row in due:
            assert row.next_run_at is not None  # only a paused schedule has none, and it is never due
            latest, following = row.schedule.latest(row.next_run_at, moment)
            ticks.append((row, latest, following))
            job_type = job_types.get(row.type)
            if job_type is None:  # its module is gone from OUTLAST_JOB_MODULES: the tick passes without a job
                log.warning("schedule %s/%s: no job type %r is registered; tick %s skipped", row.tenant_id, row.id,
                            row.type, latest)  # fmt: skip
            jobs.append(None if job_type is None else job_of(row, job_type, config, tick=latest))
        wanted = [job for job in jobs if job is not None]
        inserted = iter(await store.insert_jobs(db, wanted) if wanted else [])
        made = [None if job is None else next(inserted) for job in jobs]  # None: none, or the tick's job exists
        runs = [
            schedules.Advance(row.tenant_id, row.id, None, following, None)
            if job is None
            else schedules.Advance(row.tenant_id, row.id, latest, following, job.id)
            for (row, latest, following), job in zip(ticks, made, strict=True)
        ]
        if runs:
            await schedules.advance(db, runs)
    await _ring(deps, [job for job in made if job is not None])
    return len(due)


async def trigger(
    deps: Deps, job_types: Mapping[str, JobType], tenant: str, schedule_id: str
) -> tuple[schedules.ScheduleRow, store.JobRow] | None:
    """A job of the schedule now, paused or not, beside its ticks (its next run stays). None: no such schedule.
    LookupError: its type is no longer registered."""
    db = deps.db
    async with db.transaction():
        row = await schedules.get(db, tenant, schedule_id, lock=True)
        if row is None:
            return None
        job_type = job_types.get(row.type)
        if job_type is None:
            raise LookupError(row.type)
        [made] = await store.insert_jobs(db, [job_of(row, job_type, deps.config, tick=None)])
        assert made is not None  # no Idempotency-Key: nothing to conflict with
        run = schedules.Advance(row.tenant_id, row.id, made.created_at, row.next_run_at, made.id)
        await schedules.advance(db, [run])
    await _ring(deps, [made])
    return row, made


@contextlib.asynccontextmanager
async def ticking(
    deps: Deps, ear: notify.Ear, job_types: Mapping[str, JobType], declared: Sequence[schedules.Definition] = ()
) -> AsyncIterator[None]:
    """Write the declared schedules, then tick while the block runs: a look at the earliest next run (`due_in`), a
    pass when one is due, then sleep until the next one, woken sooner when `ear` hears that a schedule was made,
    resumed or moved earlier (worker/notify.py). Not listening, it looks every `sweep_interval_s` as well."""
    await schedules.sync_declared(deps.db, declared)
    interval = deps.config.sweep_interval_s

    async def loop() -> None:
        alarm = ear.alarm(notify.SCHEDULES)
        while True:
            alarm.looking()
            try:
                alarm.learned(await _next_run(deps, job_types))
            except database.UNAVAILABLE as exc:
                log.warning("schedules: tick skipped, database unavailable (%s)", exc)
                alarm.learned(time.monotonic() + interval)
            except Exception:
                log.exception("schedules: tick failed; the next pass tries again")
                alarm.learned(time.monotonic() + interval)
            await alarm.sleep(notify.IDLE_S if ear.listening else interval)

    task = asyncio.create_task(loop(), name="outlast-ticker")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _next_run(deps: Deps, job_types: Mapping[str, JobType]) -> float:
    """Tick if a schedule is due; when (time.monotonic()) the next one is."""
    due_in = await schedules.due_in(deps.db)
    if due_in is not None and due_in <= 0:
        while await tick(deps, job_types) >= deps.config.sweep_batch:
            pass  # a full batch: more may be due
        due_in = await schedules.due_in(deps.db)
    if due_in is None:
        return math.inf
    return time.monotonic() + max(due_in, _MIN_SLEEP_S)
