"""End-to-end noop jobs/s: Outlast (1 web + 1 worker, submit over HTTP) against three baselines, in the same rounds.

- the naive design-card app (bench/baselines/naive.py: Starlette + `databases` + arq defaults) and the FastAPI +
  Celery app (bench/baselines/fastapi_celery.py): the same K POSTs from the same client, timed from the first
  POST until their own status table says all K succeeded, as Outlast's is;
- the database's own ceiling: commits/s of 8 connections doing one-row INSERTs, divided by the 3 commits a
  job needs.

The Celery worker runs Celery's default pool, prefork, with concurrency pinned to 2: the default on this
2-core machine (one child per core), pinned so the figure does not change meaning on a bigger one. That is
three processes (the consumer and two children) against Outlast's one worker process: the comparison gives
Celery the machine the way its tutorials run it.

Each Outlast round also counts its write transactions per job, exactly, from the transaction-id counter.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Measure, Metric, alternate_many
from bench.procs import load
from bench.run import Run, baseline_env, outlast_env
from bench.services import DATABASE
from worker.connections import QUEUE

WEB, WORKER, ARQ = "jobs-outlast-web", "jobs-outlast-worker", "jobs-arq"  # process names, and their logs' names
NAIVE_WEB, NAIVE_WORKER = "jobs-naive-web", "jobs-naive-worker"
CELERY_WEB, CELERY_WORKER = "jobs-celery-web", "jobs-celery-worker"
LABEL = "noop jobs/s, submit to all done"
CELERY_CONCURRENCY = 2
# The baselines' status tables, and the key the Celery worker sets once ready: named in their modules, which
# read their services from the environment as they import, so this process does not import them.
NAIVE_TABLE, CELERY_TABLE, CELERY_READY_KEY = "naive_jobs", "celery_jobs", "bench:celery:ready"
WRITES_PER_JOB = 3  # the submit's INSERT, the claim, the finish
PROBE_CONNECTIONS = 8  # the "commits/s with 8 connections"
# The batch's poller commits one transaction per poll plus one for opening its asyncpg connection
# (measured: connect, 100 fetchval, close = 101); subtracted so the count is Outlast's alone.
POLL_CONNECT_XACTS = 1


async def start_outlast(run: Run) -> str:
    env = outlast_env(run.svc)
    worker = run.fleet.worker(WORKER, "worker.settings.WorkerSettings", env, run.svc.redis_url, QUEUE)
    url, _ = await asyncio.gather(run.fleet.outlast(WEB, env), worker)
    return url


async def stop_outlast(run: Run) -> None:
    await run.fleet.stop(WEB)
    await run.fleet.stop(WORKER)


async def start_arq(run: Run) -> None:
    # By name: the module reads its Redis URL at import, which only the worker process has.
    settings = "bench.baselines.arq_defaults.WorkerSettings"
    await run.fleet.worker(ARQ, settings, baseline_env(run.svc), run.svc.baseline_redis_url, "arq:queue")


async def start_naive(run: Run) -> str:
    env = baseline_env(run.svc)
    worker = run.fleet.worker(
        NAIVE_WORKER, "bench.baselines.naive.WorkerSettings", env, run.svc.naive_redis_url, "arq:queue"
    )
    url, _ = await asyncio.gather(run.fleet.web(NAIVE_WEB, "bench.baselines.naive:create_app", env), worker)
    return url


async def start_celery(run: Run) -> str:
    env = baseline_env(run.svc)
    url = await run.fleet.web(CELERY_WEB, "bench.baselines.fastapi_celery:create_app", env)  # creates its table
    redis = Redis.from_url(run.svc.celery_redis_url)
    try:
        await redis.delete(CELERY_READY_KEY)
        argv = [sys.executable, "-m", "celery", "-A", "bench.baselines.fastapi_celery", "worker"]
        argv += ["--pool", "prefork", "--concurrency", str(CELERY_CONCURRENCY), "--loglevel", "info"]
        await run.fleet.process(CELERY_WORKER, argv, env, lambda: _has(redis, CELERY_READY_KEY))
    finally:
        await redis.aclose()
    return url


async def _has(redis: Redis, key: str) -> bool:
    return bool(await redis.exists(key))


async def next_xid(admin: asyncpg.Connection) -> int:
    """The next transaction id: counts write transactions at once, unlike pg_stat_database's lagging counters."""
    return int(await admin.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


async def _settled_commits(admin: asyncpg.Connection) -> int:
    """xact_commit of the bench database once no session is left on it.

    A backend reports its counts at most once a second while busy and after 10 s idle, but always when it
    exits: with every session gone the counter is exact.
    """
    deadline = time.monotonic() + 30
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'"
    while await admin.fetchval(sessions, DATABASE):
        if time.monotonic() > deadline:
            raise RuntimeError(f"sessions on {DATABASE} did not end")
        await asyncio.sleep(0.05)
    return int(await admin.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", DATABASE))


async def _execute(database_url: str, sql: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def truncate(database_url: str, table: str = "jobs") -> None:
    await _execute(database_url, f"TRUNCATE {table} CASCADE")


async def reset_outlast(run: Run) -> None:
    """No jobs, and nothing on Outlast's queue: a message left there (say by the POST measurement, which runs
    no worker) would reach the next worker as a claim matching no row."""
    await truncate(run.svc.database_url, "jobs, workflows")
    redis = Redis.from_url(run.svc.redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def commits_per_job(
    run: Run, admin: asyncpg.Connection, jobs: int | None = None, body: str | None = None, *, warm_up: int = 0
) -> dict[str, float]:
    """One untimed batch of `jobs` jobs (noops unless `body` says otherwise) on fresh processes, counted from
    before they start until after they exit.

    The count includes their start-up and the sweep's passes while the batch ran, as a real deployment's would.
    `warm_up` jobs of the same kind run first on the same processes (and are counted too): they open the pools'
    connections and prepare the statements on them, a cost per connection rather than per job.
    """
    jobs = jobs or run.settings.jobs
    await reset_outlast(run)
    commits0, xid0 = await _settled_commits(admin), await next_xid(admin)
    url = await start_outlast(run)
    ours = 0
    try:
        args = ["--url", url, "--database-url", run.svc.database_url]
        extra = ["--api-key", run.api_key, *(["--body", body] if body else [])]
        if warm_up:
            warm = await load("submit", *args, "--jobs", str(warm_up), *extra)
            ours += warm["polls"] + POLL_CONNECT_XACTS
            await truncate(run.svc.database_url)  # the batch's poller counts done jobs: it starts from none
        batch = await load("submit", *args, "--jobs", str(jobs), *extra)
        ours += batch["polls"] + POLL_CONNECT_XACTS
    finally:
        await stop_outlast(run)
    commits1, xid1 = await _settled_commits(admin), await next_xid(admin)
    return {
        "commits_per_job": (commits1 - commits0 - ours) / (jobs + warm_up),
        "write_transactions_per_job": (xid1 - xid0) / (jobs + warm_up),
        "commits": commits1 - commits0 - ours,
        "write_transactions": xid1 - xid0,
    }


async def measure(run: Run) -> list[Comparison]:
    s = run.settings
    jobs, concurrency = str(s.jobs), str(s.concurrency)
    comparisons = {
        "noop_jobs_naive": Comparison(
            "noop_jobs_naive",
            "naive: Starlette + databases + arq defaults",
            [Metric("jobs_per_s", LABEL, higher_is_better=True, goal=2.0)],
        ),
        "noop_jobs_celery": Comparison(
            "noop_jobs_celery",
            f"FastAPI + Celery (prefork, {CELERY_CONCURRENCY}) + SQLAlchemy",
            [Metric("jobs_per_s", LABEL, higher_is_better=True, goal=10.0)],
        ),
        "db_ceiling": Comparison(
            "db_ceiling",
            f"PostgreSQL commits/s ({PROBE_CONNECTIONS} connections) / {WRITES_PER_JOB}",
            [Metric("jobs_per_s", LABEL, higher_is_better=True, goal=0.25)],
        ),
    }
    for comparison in comparisons.values():
        comparison.notes.update(jobs=s.jobs, concurrency=s.concurrency)
    admin = await asyncpg.connect(run.svc.admin_url)
    naive_redis = Redis.from_url(run.svc.naive_redis_url)
    try:
        await reset_outlast(run)
        await naive_redis.flushdb()
        url, naive_url, celery_url = await asyncio.gather(start_outlast(run), start_naive(run), start_celery(run))
        write_xacts: list[float] = []
        probes: list[float] = []

        async def outlast(n: str = jobs) -> Figures:
            await truncate(run.svc.database_url)
            xid0, web0, worker0 = await next_xid(admin), run.fleet.cpu_s(WEB), run.fleet.cpu_s(WORKER)
            args = ["--database-url", run.svc.database_url, "--jobs", n, "--concurrency", concurrency]
            figures = await load("submit", "--url", url, *args, "--api-key", run.api_key)
            write_xacts.append((await next_xid(admin) - xid0) / int(n))
            return {
                "jobs_per_s": figures["jobs_per_s"],
                "submitted_s": figures["submitted_s"],  # all POSTs answered: the rest is the worker catching up
                "web_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(WEB) - web0) / int(n),
                "worker_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(WORKER) - worker0) / int(n),
            }

        def app(table: str, web_url: str, web: str, worker: str) -> Measure:
            """A baseline that, like Outlast, takes its jobs over HTTP and keeps a status row."""

            async def one(n: str = jobs) -> Figures:
                await truncate(run.svc.database_url, table)
                if table == NAIVE_TABLE:
                    await naive_redis.flushdb()  # arq keeps results an hour: start each round from an empty index
                web0, worker0 = run.fleet.cpu_s(web), run.fleet.cpu_s(worker)
                args = [
                    "--database-url",
                    run.svc.database_url,
                    "--jobs",
                    n,
                    "--concurrency",
                    concurrency,
                    "--table",
                    table,
                ]
                figures = await load("submit", "--url", web_url, *args, "--api-key", run.api_key)
                return {
                    "jobs_per_s": figures["jobs_per_s"],
                    "submitted_s": figures["submitted_s"],
                    "web_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(web) - web0) / int(n),
                    "worker_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(worker) - worker0) / int(n),
                }

            return one

        async def ceiling() -> Figures:
            args = ["--concurrency", str(PROBE_CONNECTIONS), "--duration", str(max(1.0, s.duration_s / 2))]
            probe = await load("commits", "--database-url", run.svc.database_url, *args)
            probes.append(probe["commits_per_s"])
            return {"jobs_per_s": probe["commits_per_s"] / WRITES_PER_JOB, "commits_per_s": probe["commits_per_s"]}

        naive_side = app(NAIVE_TABLE, naive_url, NAIVE_WEB, NAIVE_WORKER)
        celery_side = app(CELERY_TABLE, celery_url, CELERY_WEB, CELERY_WORKER)
        # One small untimed batch each: pools fill, code paths warm, before anything is timed.
        warm = str(max(1, s.jobs // 4))
        for warm_up in (outlast, naive_side, celery_side):
            await warm_up(warm)
        write_xacts.clear()
        sides = [
            (comparisons["noop_jobs_naive"], naive_side),
            (comparisons["noop_jobs_celery"], celery_side),
            (comparisons["db_ceiling"], ceiling),
        ]
        await alternate_many(sides, outlast, s.rounds)
        notes = comparisons["db_ceiling"].notes
        notes["write_transactions_per_job_rounds"] = write_xacts
        notes["write_transactions_per_job"] = statistics.median(write_xacts)
        notes["db_commits_per_s"] = statistics.median(probes)
        notes["db_probe_connections"] = PROBE_CONNECTIONS
    finally:
        for name in (WEB, WORKER, NAIVE_WEB, NAIVE_WORKER, CELERY_WEB, CELERY_WORKER):
            await run.fleet.stop(name)
        await naive_redis.aclose()
        await admin.close()
    return list(comparisons.values())
