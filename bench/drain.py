"""Worker drain: 2,000 noop jobs preloaded with no worker running, then one worker started to run them all.

- Outlast: rows inserted and rung exactly as `POST /v1/jobs` does (`store.insert_jobs`, then the doorbell with
  the job's priority and tenant), with the web stopped; then `arq worker.settings.WorkerSettings`.
- Baseline (bench/baselines/arq_tuned.py): a bare arq worker tuned as Outlast tunes its own (poll_delay
  0.05 s, max_jobs 100; pickle and results otherwise as arq comes), its queue preloaded with `enqueue_job`.

The figure is jobs ÷ (the last job's finish - the first job's start), from each job's own record (the rows'
`started_at`/`finished_at`; arq's results' `start_time`/`finish_time`), so neither worker's start-up is
counted. The preloading is not timed, and is done by this process: it is not load, only setup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
from arq.connections import RedisSettings, create_pool
from arq.jobs import deserialize_result
from redis.asyncio import Redis
from uuid_utils.compat import uuid7

from bench.compare import Comparison, Figures, Metric, alternate
from bench.noop_jobs import reset_outlast
from bench.run import Run, baseline_env, outlast_env
from worker import Config, connect, from_env, store
from worker.connections import QUEUE
from worker.queue import Bell, enqueue_many

WORKER, ARQ = "drain-outlast-worker", "drain-arq-tuned"  # process names, and their logs' names
METRICS = [Metric("jobs_per_s", "worker drain of preloaded noop jobs/s", higher_is_better=True, goal=0.5)]
POLL_S = 0.05
STALL_S = 60.0
PRELOADERS = 10  # concurrent inserts: Outlast's default pool size


async def _until(count: Callable[[], Awaitable[int]], jobs: int) -> None:
    """Poll `count()` until it reaches `jobs`; fail if it stops moving for STALL_S."""
    seen, moved = -1, time.monotonic()
    while (now := await count()) < jobs:
        if now != seen:
            seen, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise RuntimeError(f"the drain stalled at {now} of {jobs} jobs")
        await asyncio.sleep(POLL_S)


def noop(config: Config, i: int) -> store.NewJob:
    """The i-th preloaded job: a plain noop, as `POST /v1/jobs {"type": "noop", "input": {}}` makes it."""
    return store.NewJob(
        id=uuid7(), tenant="default", type="noop", input=b"{}", max_attempts=config.default_max_attempts,
        timeout_s=60, retry_safe=True, callback_url=None, metadata=b"{}", ttl_s=config.job_ttl_s,
    )  # fmt: skip


async def preload_outlast(run: Run, jobs: int, make: Callable[[Config, int], store.NewJob] = noop) -> None:
    config = from_env(outlast_env(run.svc))
    slots = asyncio.Semaphore(PRELOADERS)

    async def one(i: int) -> None:
        async with slots:
            job = make(config, i)
            if (await store.insert_jobs(deps.db, [job]))[0] is None:
                raise RuntimeError("a preloaded job was taken for a duplicate")
            if not await enqueue_many(deps.redis, [Bell(job.id, 0, job.priority, job.tenant)]):
                raise RuntimeError("Redis refused a preloaded job")

    async with connect(config) as deps:
        await asyncio.gather(*(one(i) for i in range(jobs)))


async def drain_outlast(
    run: Run, db: asyncpg.Connection, jobs: int, make: Callable[[Config, int], store.NewJob] = noop
) -> Figures:
    """One Outlast round: `jobs` preloaded (`make` each), one worker started, its span once all succeeded."""

    async def succeeded() -> int:
        return int(await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))

    await reset_outlast(run)
    await preload_outlast(run, jobs, make)
    await run.fleet.worker(WORKER, "worker.settings.WorkerSettings", outlast_env(run.svc), run.svc.redis_url, QUEUE)
    try:
        await _until(succeeded, jobs)
    finally:
        await run.fleet.stop(WORKER)
    span = await db.fetchval("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs")
    return {"jobs_per_s": jobs / float(span), "span_s": float(span)}


async def measure(run: Run) -> Comparison:
    s = run.settings
    jobs = s.drain_jobs
    baseline_redis = Redis.from_url(run.svc.baseline_redis_url)
    db = await asyncpg.connect(run.svc.database_url)

    async def outlast() -> Figures:
        return await drain_outlast(run, db, jobs)

    async def baseline() -> Figures:
        await baseline_redis.flushdb()
        arq = await create_pool(RedisSettings.from_dsn(run.svc.baseline_redis_url))
        try:
            enqueued = await asyncio.gather(*(arq.enqueue_job("noop") for _ in range(jobs)))
            keys = [f"arq:result:{job.job_id}" for job in enqueued if job is not None]
            settings = "bench.baselines.arq_tuned.WorkerSettings"
            await run.fleet.worker(ARQ, settings, baseline_env(run.svc), run.svc.baseline_redis_url, "arq:queue")
            try:

                async def results() -> int:
                    return int(await arq.exists(*keys))

                await _until(results, jobs)
            finally:
                await run.fleet.stop(ARQ)
            records = [deserialize_result(raw) for raw in await arq.mget(keys)]
        finally:
            await arq.aclose()
        first = min(r.start_time for r in records)
        last = max(r.finish_time for r in records)
        span = (last - first).total_seconds()
        return {"jobs_per_s": jobs / span, "span_s": span}

    comparison = Comparison("drain", "arq tuned: poll 0.05 s, max_jobs 100, pickle", METRICS)
    comparison.notes["jobs"] = jobs
    try:
        return await alternate(comparison, outlast, baseline, s.rounds)
    finally:
        await run.fleet.stop(WORKER)
        await run.fleet.stop(ARQ)
        await baseline_redis.aclose()
        await db.close()
