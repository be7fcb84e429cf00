"""End-to-end noop jobs/s: Outlast (1 web + 1 worker, submit over HTTP) against six baselines, in the same rounds.

- the naive design-card app (bench/baselines/naive.py: Starlette + `databases` + arq defaults) and the FastAPI +
  Celery app (bench/baselines/fastapi_celery.py): the same K POSTs from the same client, timed from the first
  POST until their own status table says all K succeeded, as Outlast's is;
- the database's own ceiling: commits/s of 8 connections doing one-row INSERTs, divided by the 3 commits a
  job needs;
- issue 20's S6 and S10, the same K POSTs to a bare Starlette app in front of each of the queues a user would
  pick instead, each with one worker process, timed until that queue's own record says all K are done:
  arq (bench/baselines/arq_web.py, the tuned arq worker, no database), SAQ (bench/baselines/saq_app.py, on
  Redis) and procrastinate (bench/baselines/procrastinate_app.py, on PostgreSQL, in a database of its own).

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
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Measure, Metric, alternate_many
from bench.procs import load
from bench.run import Run, Settings, baseline_env, outlast_env
from bench.services import DATABASE, with_database
from worker.connections import QUEUE

WEB, WORKER, ARQ = "jobs-outlast-web", "jobs-outlast-worker", "jobs-arq"  # process names, and their logs' names
NAIVE_WEB, NAIVE_WORKER = "jobs-naive-web", "jobs-naive-worker"
CELERY_WEB, CELERY_WORKER = "jobs-celery-web", "jobs-celery-worker"
ARQ_WEB, ARQ_WORKER = "jobs-arq-web", "jobs-arq-worker"
SAQ_WEB, SAQ_WORKER = "jobs-saq-web", "jobs-saq-worker"
PROCRASTINATE_WEB, PROCRASTINATE_WORKER = "jobs-procrastinate-web", "jobs-procrastinate-worker"
LABEL = "noop jobs/s, submit to all done"
CELERY_CONCURRENCY = 2
# The baselines' status tables, and the key the Celery worker sets once ready: named in their modules, which
# read their services from the environment as they import, so this process does not import them.
NAIVE_TABLE, CELERY_TABLE, CELERY_READY_KEY = "naive_jobs", "celery_jobs", "bench:celery:ready"
# The same for the peers (bench/baselines/saq_app.py, procrastinate_app.py), which import saq and procrastinate.
SAQ_STATS_KEY, PROCRASTINATE_TABLE = "saq:default:stats", "procrastinate_jobs"
PROCRASTINATE_DATABASE = "procrastinate_bench"  # its schema, on the bench's PostgreSQL beside outlast_bench
SAQ_REDIS_INDEX = 4  # Outlast's index + 4: the three before it are arq's, the naive app's and Celery's
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


def saq_redis_url(run: Run) -> str:
    parts = urlsplit(run.svc.redis_url)
    return parts._replace(path=f"/{int(parts.path.strip('/') or 0) + SAQ_REDIS_INDEX}").geturl()


def procrastinate_url(run: Run) -> str:
    return with_database(run.svc.admin_url, PROCRASTINATE_DATABASE)


def peer_env(run: Run) -> dict[str, str]:
    """baseline_env, and the services of the peers (SAQ's Redis index, procrastinate's database)."""
    env = baseline_env(run.svc)
    env.update(BENCH_SAQ_REDIS_URL=saq_redis_url(run), BENCH_PROCRASTINATE_DATABASE_URL=procrastinate_url(run))
    return env


async def prepare_peers(run: Run) -> None:
    """procrastinate's database, new, with its schema; SAQ's Redis index empty (Valkey keeps its data)."""
    from bench.baselines.procrastinate_app import prepare

    await _execute(run.svc.admin_url, f"DROP DATABASE IF EXISTS {PROCRASTINATE_DATABASE} WITH (FORCE)")
    await _execute(run.svc.admin_url, f"CREATE DATABASE {PROCRASTINATE_DATABASE}")
    await prepare(procrastinate_url(run))
    await flush(saq_redis_url(run))


async def flush(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def start_arq_web(run: Run) -> str:
    env = baseline_env(run.svc)
    settings = "bench.baselines.arq_tuned.WorkerSettings"
    worker = run.fleet.worker(ARQ_WORKER, settings, env, run.svc.baseline_redis_url, "arq:queue")
    url, _ = await asyncio.gather(run.fleet.web(ARQ_WEB, "bench.baselines.arq_web:create_app", env), worker)
    return url


async def start_saq_worker(run: Run, name: str) -> None:
    redis = Redis.from_url(saq_redis_url(run))
    try:
        await redis.delete(SAQ_STATS_KEY)  # an earlier worker's must not pass for this one's
        argv = [sys.executable, "-m", "saq", "bench.baselines.saq_app.settings"]
        await run.fleet.process(name, argv, peer_env(run), lambda: _has(redis, SAQ_STATS_KEY))
    finally:
        await redis.aclose()


async def start_saq(run: Run) -> str:
    url, _ = await asyncio.gather(
        run.fleet.web(SAQ_WEB, "bench.baselines.saq_app:create_app", peer_env(run)), start_saq_worker(run, SAQ_WORKER)
    )
    return url


async def start_procrastinate_worker(run: Run, name: str) -> None:
    db = await asyncpg.connect(procrastinate_url(run))
    try:
        await db.execute("DELETE FROM procrastinate_workers")  # a stopped worker's row must not pass for this one's

        async def registered() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM procrastinate_workers"))

        argv = [sys.executable, "-m", "bench.baselines.procrastinate_worker"]
        await run.fleet.process(name, argv, peer_env(run), registered)
    finally:
        await db.close()


async def start_procrastinate(run: Run) -> str:
    web = run.fleet.web(PROCRASTINATE_WEB, "bench.baselines.procrastinate_app:create_app", peer_env(run))
    url, _ = await asyncio.gather(web, start_procrastinate_worker(run, PROCRASTINATE_WORKER))
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


def metric(goal: float | None, *, cpu: bool = False) -> list[Metric]:
    """jobs/s against `goal`; with `cpu`, each process's CPU per job beside it (no goal: what explains the ratio)."""
    metrics = [Metric("jobs_per_s", LABEL, higher_is_better=True, goal=goal)]
    if cpu:
        metrics.append(Metric("web_cpu_ms_per_job", "web CPU ms per noop job", higher_is_better=False))
        metrics.append(Metric("worker_cpu_ms_per_job", "worker CPU ms per noop job", higher_is_better=False))
    return metrics


def _comparisons(s: Settings) -> dict[str, Comparison]:
    comparisons = {
        "noop_jobs_naive": Comparison("noop_jobs_naive", "naive: Starlette + databases + arq defaults", metric(2.0)),
        # Issue 20 retired the 10x goal (more than bare arq itself gives here): S6 anchors the path on bare arq.
        "noop_jobs_celery": Comparison(
            "noop_jobs_celery", f"FastAPI + Celery (prefork, {CELERY_CONCURRENCY}) + SQLAlchemy", metric(None)
        ),
        "db_ceiling": Comparison(
            "db_ceiling", f"PostgreSQL commits/s ({PROBE_CONNECTIONS} connections) / {WRITES_PER_JOB}", metric(0.25)
        ),
        "noop_jobs_arq": Comparison(
            "noop_jobs_arq", "S6: Starlette + arq enqueue_job + arq tuned, no database", metric(0.7, cpu=True)
        ),
        "noop_jobs_saq": Comparison(
            "noop_jobs_saq", "S10: Starlette + SAQ (Redis, concurrency 10)", metric(1.0, cpu=True)
        ),
        "noop_jobs_procrastinate": Comparison(
            "noop_jobs_procrastinate",
            "S10: Starlette + procrastinate (PostgreSQL, concurrency 10)",
            metric(2.5, cpu=True),
        ),
    }
    for comparison in comparisons.values():
        comparison.notes.update(jobs=s.jobs, concurrency=s.concurrency)
    return comparisons


async def measure(run: Run) -> list[Comparison]:
    s = run.settings
    jobs, concurrency = str(s.jobs), str(s.concurrency)
    comparisons = _comparisons(s)
    admin = await asyncpg.connect(run.svc.admin_url)
    naive_redis = Redis.from_url(run.svc.naive_redis_url)
    try:
        await reset_outlast(run)
        await naive_redis.flushdb()
        await prepare_peers(run)
        url, naive_url, celery_url, arq_url, saq_url, procrastinate_web = await asyncio.gather(
            start_outlast(run), start_naive(run), start_celery(run), start_arq_web(run), start_saq(run),
            start_procrastinate(run),
        )  # fmt: skip
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

        def app(web_url: str, web: str, worker: str, reset: Callable[[], Awaitable[None]], *done: str) -> Measure:
            """A baseline that, like Outlast, takes its jobs over HTTP; `done` says how the load counts them."""

            async def one(n: str = jobs) -> Figures:
                await reset()
                web0, worker0 = run.fleet.cpu_s(web), run.fleet.cpu_s(worker)
                args = ["--jobs", n, "--concurrency", concurrency, *done]
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

        async def reset_naive() -> None:
            await truncate(run.svc.database_url, NAIVE_TABLE)
            await naive_redis.flushdb()  # arq keeps results an hour: start each round from an empty index

        def table(url: str, name: str) -> list[str]:
            return ["--database-url", url, "--table", name]

        bench_db, peer_db = run.svc.database_url, procrastinate_url(run)
        sides = {
            "noop_jobs_naive": app(naive_url, NAIVE_WEB, NAIVE_WORKER, reset_naive, *table(bench_db, NAIVE_TABLE)),
            "noop_jobs_celery": app(
                celery_url, CELERY_WEB, CELERY_WORKER, lambda: truncate(bench_db, CELERY_TABLE),
                *table(bench_db, CELERY_TABLE),
            ),
            "db_ceiling": ceiling,
            "noop_jobs_arq": app(
                arq_url, ARQ_WEB, ARQ_WORKER, lambda: flush(run.svc.baseline_redis_url),
                "--done", "arq", "--redis-url", run.svc.baseline_redis_url,
            ),
            "noop_jobs_saq": app(
                saq_url, SAQ_WEB, SAQ_WORKER, lambda: flush(saq_redis_url(run)),
                "--done", "saq", "--redis-url", saq_redis_url(run),
            ),
            "noop_jobs_procrastinate": app(
                procrastinate_web, PROCRASTINATE_WEB, PROCRASTINATE_WORKER,
                lambda: truncate(peer_db, PROCRASTINATE_TABLE), *table(peer_db, PROCRASTINATE_TABLE),
            ),
        }  # fmt: skip
        # One small untimed batch each: pools fill, code paths warm, before anything is timed.
        warm = str(max(1, s.jobs // 4))
        for warm_up in (outlast, *(side for side in sides.values() if side is not ceiling)):
            await warm_up(warm)
        write_xacts.clear()
        await alternate_many([(comparisons[name], side) for name, side in sides.items()], outlast, s.rounds)
        notes = comparisons["db_ceiling"].notes
        notes["write_transactions_per_job_rounds"] = write_xacts
        notes["write_transactions_per_job"] = statistics.median(write_xacts)
        notes["db_commits_per_s"] = statistics.median(probes)
        notes["db_probe_connections"] = PROBE_CONNECTIONS
    finally:
        for name in (WEB, WORKER, NAIVE_WEB, NAIVE_WORKER, CELERY_WEB, CELERY_WORKER, ARQ_WEB, ARQ_WORKER):
            await run.fleet.stop(name)
        for name in (SAQ_WEB, SAQ_WORKER, PROCRASTINATE_WEB, PROCRASTINATE_WORKER):
            await run.fleet.stop(name)
        await naive_redis.aclose()
        await admin.close()
    return list(comparisons.values())
