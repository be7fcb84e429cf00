"""Idle submit → running latency: Outlast (1 web + 1 worker) against a bare arq worker with its defaults.

One job at a time on an otherwise idle system, each after a random pause of up to 0.5 s (the same on both
sides), so that submits land at random points of each worker's poll cycle rather than just after the poll
that ran the previous job. Outlast's figure runs from sending `POST /v1/jobs` until the row's `started_at`
(set by the claim that makes it `running`); arq's from calling `enqueue_job` until arq starts the job (its
result's `start_time`). Both clocks are this machine's wall clock; the poller's own delay is not in either.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Metric, alternate
from bench.noop_jobs import ARQ, reset_outlast, start_arq, start_outlast, stop_outlast
from bench.procs import load
from bench.run import Run

GAP_S = 0.5  # arq's default poll delay: a pause drawn from [0, this) puts a submit anywhere in its cycle
METRICS = [
    Metric("p50_ms", "idle submit to running p50 ms", higher_is_better=False, goal=0.2),
    Metric("p99_ms", "idle submit to running p99 ms", higher_is_better=False, goal=0.25),
]


async def measure(run: Run) -> Comparison:
    s = run.settings
    samples = ["--samples", str(s.latency_samples), "--gap", str(GAP_S)]
    baseline_redis = Redis.from_url(run.svc.baseline_redis_url)
    try:
        await reset_outlast(run)
        await baseline_redis.flushdb()
        url, _ = await asyncio.gather(start_outlast(run), start_arq(run))

        async def outlast() -> Figures:
            args = ["--database-url", run.svc.database_url, "--api-key", run.api_key, *samples]
            figures = await load("latency", "--url", url, *args)
            return {m.key: figures[m.key] for m in METRICS}

        async def baseline() -> Figures:
            figures = await load("latency-arq", "--redis-url", run.svc.baseline_redis_url, *samples)
            return {m.key: figures[m.key] for m in METRICS}

        comparison = Comparison("latency", "arq defaults: poll 0.5 s, max_jobs 10, pickle", METRICS)
        comparison.notes.update(samples_per_round=s.latency_samples, gap_s=GAP_S)
        return await alternate(comparison, outlast, baseline, s.rounds)
    finally:
        await stop_outlast(run)
        await run.fleet.stop(ARQ)
        await baseline_redis.aclose()
