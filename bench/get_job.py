"""GET /v1/jobs/{id}: Outlast's web process against bench/baselines/raw_poll.py and the FastAPI + Celery app.

All three read the same succeeded rows at random from the same database (the FastAPI app from its own table,
holding the same ids), each as one uvicorn process with the same flags; only one of them is under load at a
time, and each round measures Outlast once for both comparisons.
"""

from __future__ import annotations

import asyncio

import asyncpg
from uuid_utils.compat import uuid7

from bench.compare import Comparison, Figures, Measure, Metric, alternate_many
from bench.run import Run, baseline_env, outlast_env

_SEED = """
INSERT INTO jobs (id, type, status, input, attempt, max_attempts, timeout_s, retry_safe, progress, result,
                  started_at, finished_at, expires_at, event_seq)
VALUES ($1, 'noop', 'succeeded', '{}', 1, 3, 60, true, '{"fraction": 1.0, "message": null}', 'null',
        now(), now(), now() + interval '7 days', 3)
"""
_SEED_CELERY = """
INSERT INTO celery_jobs (id, type, status, input, result, created_at, started_at, finished_at)
VALUES ($1, 'noop', 'succeeded', '{}', 'null', now(), now(), now())
"""
# process names, and their logs' names
OUTLAST, RAW, CELERY = "get-outlast", "get-raw-poll", "get-fastapi-celery"
METRICS = [
    Metric("rps", "GET /v1/jobs/{id} req/s", higher_is_better=True, goal=0.6),
    Metric("p50_ms", "GET /v1/jobs/{id} p50 ms", higher_is_better=False),
    Metric("p99_ms", "GET /v1/jobs/{id} p99 ms", higher_is_better=False),
    # The server's own CPU per answer: steadier than req/s where client and server share few cores.
    Metric("cpu_us", "GET /v1/jobs/{id} server CPU us/req", higher_is_better=False),
]
CELERY_METRICS = [
    Metric("rps", "GET /v1/jobs/{id} req/s", higher_is_better=True, goal=5.0),
    Metric("p99_ms", "GET /v1/jobs/{id} p99 ms", higher_is_better=False),
    Metric("cpu_us", "GET /v1/jobs/{id} server CPU us/req", higher_is_better=False),
]
RAW_POLL = "raw_poll: Starlette + asyncpg SELECT + msgspec"
FASTAPI_CELERY = "FastAPI + SQLAlchemy ORM (Celery app)"


async def seed(database_url: str, n: int, *, celery: bool = True) -> list[str]:
    """n succeeded noop jobs, written straight into both tables (their history is not what is measured)."""
    ids = [uuid7() for _ in range(n)]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE jobs CASCADE")
        await conn.executemany(_SEED, [(i,) for i in ids])
        await conn.execute("ANALYZE jobs")
        if celery:  # the FastAPI app's table, which exists once it has started
            await conn.execute("TRUNCATE celery_jobs")
            await conn.executemany(_SEED_CELERY, [(i,) for i in ids])
            await conn.execute("ANALYZE celery_jobs")
    finally:
        await conn.close()
    return [str(i) for i in ids]


async def measure(run: Run) -> list[Comparison]:
    s = run.settings
    ids_file = run.scratch / "ids.txt"
    env = outlast_env(run.svc)
    try:
        # The FastAPI app creates its table as it starts, so all start before the seeding.
        outlast_url, raw_url, celery_url = await asyncio.gather(
            run.fleet.outlast(OUTLAST, env),
            run.fleet.web(RAW, "bench.baselines.raw_poll:create_app", baseline_env(run.svc)),
            run.fleet.web(CELERY, "bench.baselines.fastapi_celery:create_app", baseline_env(run.svc)),
        )
        ids_file.write_text("\n".join(await seed(run.svc.database_url, s.seed_jobs)))

        def side(name: str, url: str) -> Measure:
            async def one() -> Figures:
                figures = await run.http_load("get", name, url, "--ids", str(ids_file), expect=200)
                return {m.key: figures[m.key] for m in METRICS}

            return one

        raw = Comparison("get_job", RAW_POLL, METRICS)
        celery = Comparison("get_job_celery", FASTAPI_CELERY, CELERY_METRICS)
        for comparison in (raw, celery):
            comparison.notes.update(seed_jobs=s.seed_jobs, concurrency=s.concurrency, duration_s=s.duration_s)
        await alternate_many(
            [(raw, side(RAW, raw_url)), (celery, side(CELERY, celery_url))], side(OUTLAST, outlast_url), s.rounds
        )
        return [raw, celery]
    finally:
        for name in (OUTLAST, RAW, CELERY):
            await run.fleet.stop(name)
