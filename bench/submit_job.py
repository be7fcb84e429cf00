"""POST /v1/jobs: Outlast's web process against bench/baselines/raw_submit.py, under the same load.

Both take noop submits on 32 keep-alive connections for a fixed time, each as one uvicorn process with the
same flags, writing into the same `jobs` table; no worker runs, so only the submit is measured. Before each
side's turn the table is emptied and that side's Redis index flushed, so neither writes into the other's
bloat.
"""

from __future__ import annotations

import asyncio

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Measure, Metric, alternate
from bench.noop_jobs import reset_outlast
from bench.run import Run, baseline_env, outlast_env

OUTLAST, BASELINE = "post-outlast", "post-raw-submit"  # process names, and their logs' names
METRICS = [
    Metric("rps", "POST /v1/jobs accepted/s", higher_is_better=True, goal=0.5),
    Metric("p50_ms", "POST /v1/jobs p50 ms", higher_is_better=False),
    Metric("p99_ms", "POST /v1/jobs p99 ms", higher_is_better=False, goal=2.5),
    Metric("cpu_us", "POST /v1/jobs server CPU us/req", higher_is_better=False),
]


async def measure(run: Run) -> Comparison:
    s = run.settings
    try:
        outlast_url, baseline_url = await asyncio.gather(
            run.fleet.outlast(OUTLAST, outlast_env(run.svc)),
            run.fleet.web(BASELINE, "bench.baselines.raw_submit:create_app", baseline_env(run.svc)),
        )

        def side(name: str, url: str, redis_url: str) -> Measure:
            async def one() -> Figures:
                conn = await asyncpg.connect(run.svc.database_url)
                try:
                    await conn.execute("TRUNCATE jobs CASCADE")
                finally:
                    await conn.close()
                redis = Redis.from_url(redis_url)
                try:
                    await redis.flushdb()
                finally:
                    await redis.aclose()
                figures = await run.http_load("post", name, url, expect=202)
                return {m.key: figures[m.key] for m in METRICS}

            return one

        comparison = Comparison("submit_job", "raw_submit: Starlette + asyncpg INSERT + Redis LPUSH", METRICS)
        comparison.notes.update(concurrency=s.concurrency, duration_s=s.duration_s)
        outlast = side(OUTLAST, outlast_url, run.svc.redis_url)
        baseline = side(BASELINE, baseline_url, run.svc.baseline_redis_url)
        return await alternate(comparison, outlast, baseline, s.rounds)
    finally:
        await run.fleet.stop(OUTLAST)
        await run.fleet.stop(BASELINE)
        await reset_outlast(run)  # the submitted jobs, and their messages, which no worker is to run
