"""Worker drain: 2,000 noop jobs preloaded with no worker running, then one worker started to run them all.

- Outlast: rows inserted and rung exactly as `POST /v1/jobs` does (`store.insert_jobs`, then the doorbell with
  the job's priority and tenant), with the web stopped; then `arq worker.settings.WorkerSettings`.
- Baseline (bench/baselines/arq_tuned.py): a bare arq worker tuned as Outlast tunes its own (poll_delay
  0.05 s, max_jobs 100; pickle and results otherwise as arq comes), its queue preloaded with `enqueue_job`.
- Issue 20's S10, in the same rounds against the same Outlast drain: a SAQ worker (bench/baselines/saq_app.py,
  its queue preloaded with `enqueue`) and a procrastinate worker (bench/baselines/procrastinate_app.py, in its
  own database, preloaded with one `batch_defer_async`), each tuned as its docs advise.

The figure is jobs ÷ (the last job's finish - the first job's start), from each job's own record (the rows'
`started_at`/`finished_at`; arq's results' `start_time`/`finish_time`; SAQ's records' `started`/`completed`;
procrastinate's `started` and `succeeded` events), so no worker's start-up is counted. The preloading is not
timed, and is done by this process: it is not load, only setup.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import asyncpg
from arq.connections import RedisSettings, create_pool
from arq.jobs import deserialize_result
from redis.asyncio import Redis
from uuid_utils.compat import uuid7

from bench.compare import Comparison, Figures, Metric, alternate_many
from bench.noop_jobs import (
    PROCRASTINATE_TABLE,
    flush,
    prepare_peers,
    procrastinate_url,
    reset_outlast,
    saq_redis_url,
    start_procrastinate_worker,
    start_saq_worker,
    truncate,
)
from bench.run import Run, baseline_env, outlast_env
from worker import Config, connect, from_env, store
from worker.connections import QUEUE
from worker.queue import Bell, enqueue_many

WORKER, ARQ = "drain-outlast-worker", "drain-arq-tuned"  # process names, and their logs' names
SAQ, PROCRASTINATE = "drain-saq", "drain-procrastinate"
LABEL = "worker drain of preloaded noop jobs/s"
METRICS = [Metric("jobs_per_s", LABEL, higher_is_better=True, goal=0.5)]
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


async def drain_saq(run: Run, jobs: int) -> Figures:
    from saq import Queue

    from bench.baselines.saq_app import INCOMPLETE_KEY, QUEUE

    await flush(saq_redis_url(run))
    queue = Queue.from_url(saq_redis_url(run), name=QUEUE)
    await queue.connect()
    try:
        enqueued = await asyncio.gather(*(queue.enqueue("noop") for _ in range(jobs)))
        ids = [job.id for job in enqueued if job is not None]
        redis = queue.redis  # type: ignore[attr-defined]
        await start_saq_worker(run, SAQ)
        try:

            async def done() -> int:
                return jobs - int(await redis.zcard(INCOMPLETE_KEY))

            await _until(done, jobs)
        finally:
            await run.fleet.stop(SAQ)
        records = [json.loads(raw) for raw in await redis.mget(ids)]
    finally:
        await queue.disconnect()
    if len(records) != jobs or any(r["status"] != "complete" for r in records):
        raise RuntimeError("SAQ's drain ended with jobs other than complete")
    span = (max(r["completed"] for r in records) - min(r["started"] for r in records)) / 1000
    return {"jobs_per_s": jobs / span, "span_s": span}


async def drain_procrastinate(run: Run, jobs: int) -> Figures:
    from procrastinate import App, PsycopgConnector

    url = procrastinate_url(run)
    await truncate(url, PROCRASTINATE_TABLE)
    async with App(connector=PsycopgConnector(conninfo=url, max_size=PRELOADERS)).open_async() as app:
        await app.configure_task("noop").batch_defer_async(*({} for _ in range(jobs)))
    db = await asyncpg.connect(url)
    try:
        await start_procrastinate_worker(run, PROCRASTINATE)
        try:

            async def succeeded() -> int:
                return int(await db.fetchval(f"SELECT count(*) FROM {PROCRASTINATE_TABLE} WHERE status = 'succeeded'"))

            await _until(succeeded, jobs)
        finally:
            await run.fleet.stop(PROCRASTINATE)
        span = await db.fetchval(
            "SELECT extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
            " - min(at) FILTER (WHERE type = 'started')) FROM procrastinate_events"
        )
    finally:
        await db.close()
    return {"jobs_per_s": jobs / float(span), "span_s": float(span)}


async def measure(run: Run) -> list[Comparison]:
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

    def metric(goal: float) -> list[Metric]:
        return [Metric("jobs_per_s", LABEL, higher_is_better=True, goal=goal)]

    comparisons = [
        Comparison("drain", "arq tuned: poll 0.05 s, max_jobs 100, pickle", METRICS),
        Comparison("drain_saq", "S10: SAQ (Redis, concurrency 10)", metric(1.0)),
        Comparison("drain_procrastinate", "S10: procrastinate (PostgreSQL, concurrency 10)", metric(2.5)),
    ]
    for comparison in comparisons:
        comparison.notes["jobs"] = jobs
    sides = [baseline, lambda: drain_saq(run, jobs), lambda: drain_procrastinate(run, jobs)]
    try:
        await prepare_peers(run)
        await alternate_many(list(zip(comparisons, sides, strict=True)), outlast, s.rounds)
        return comparisons
    finally:
        for name in (WORKER, ARQ, SAQ, PROCRASTINATE):
            await run.fleet.stop(name)
        await baseline_redis.aclose()
        await db.close()
