"""End-to-end noop jobs/s: Outlast (1 web + 1 worker, submit over HTTP) against a bare arq with its defaults.

Outlast's figure runs from the first POST until the jobs table says all K succeeded; arq's from the first
enqueue_job until all K results exist. So the ratio prices what Outlast adds around a job (an HTTP submit,
three durable commits) against arq's polling defaults, which keep nothing durable.

Afterwards one more Outlast batch, untimed, counts the database's commits per job.
"""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Metric, alternate
from bench.procs import load
from bench.run import Run, outlast_env
from bench.services import DATABASE
from worker.queue import QUEUE

WEB, WORKER, ARQ = "jobs-outlast-web", "jobs-outlast-worker", "jobs-arq"  # process names, and their logs' names
METRICS = [Metric("jobs_per_s", "noop jobs/s, submit to all done", higher_is_better=True)]
# The batch's poller commits one transaction per poll plus one for opening its asyncpg connection
# (measured: connect, 100 fetchval, close = 101); subtracted so the count is Outlast's alone.
POLL_CONNECT_XACTS = 1


async def _start_outlast(run: Run) -> str:
    env = outlast_env(run.svc)
    url = await run.fleet.web(WEB, "server.app:create_app", env)
    await run.fleet.worker(WORKER, "worker.settings.WorkerSettings", env, run.svc.redis_url, QUEUE)
    return url


async def _stop_outlast(run: Run) -> None:
    await run.fleet.stop(WEB)
    await run.fleet.stop(WORKER)


async def _start_arq(run: Run) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_")}
    env["BENCH_BASELINE_REDIS_URL"] = run.svc.baseline_redis_url
    # By name: the module reads its Redis URL at import, which only the worker process has.
    settings = "bench.baselines.arq_defaults.WorkerSettings"
    await run.fleet.worker(ARQ, settings, env, run.svc.baseline_redis_url, "arq:queue")


async def _next_xid(admin: asyncpg.Connection) -> int:
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


async def _truncate(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE jobs CASCADE")
    finally:
        await conn.close()


async def commits_per_job(run: Run, admin: asyncpg.Connection) -> dict[str, float]:
    """One untimed batch on fresh processes, counted from before they start until after they exit.

    The count includes their start-up and the sweep's passes while the batch ran, as a real deployment's would.
    """
    jobs = run.settings.jobs
    await _truncate(run.svc.database_url)
    commits0, xid0 = await _settled_commits(admin), await _next_xid(admin)
    url = await _start_outlast(run)
    try:
        batch = await load("submit", "--url", url, "--database-url", run.svc.database_url, "--jobs", str(jobs))
    finally:
        await _stop_outlast(run)
    commits1, xid1 = await _settled_commits(admin), await _next_xid(admin)
    ours = batch["polls"] + POLL_CONNECT_XACTS
    return {
        "commits_per_job": (commits1 - commits0 - ours) / jobs,
        "write_transactions_per_job": (xid1 - xid0) / jobs,
    }


async def measure(run: Run) -> Comparison:
    s = run.settings
    jobs, concurrency = str(s.jobs), str(s.concurrency)
    comparison = Comparison("noop_jobs", "arq defaults: poll 0.5 s, max_jobs 10, pickle", METRICS)
    comparison.notes.update(jobs=s.jobs, concurrency=s.concurrency)
    admin = await asyncpg.connect(run.svc.admin_url)
    baseline_redis = Redis.from_url(run.svc.baseline_redis_url)
    try:
        await _truncate(run.svc.database_url)
        await baseline_redis.flushdb()
        url = await _start_outlast(run)
        await _start_arq(run)
        write_xacts: list[float] = []

        async def outlast(n: str = jobs) -> Figures:
            await _truncate(run.svc.database_url)
            xid0, web0, worker0 = await _next_xid(admin), run.fleet.cpu_s(WEB), run.fleet.cpu_s(WORKER)
            figures = await load("submit", "--url", url, "--database-url", run.svc.database_url, "--jobs", n)
            write_xacts.append((await _next_xid(admin) - xid0) / int(n))
            return {
                "jobs_per_s": figures["jobs_per_s"],
                "submitted_s": figures["submitted_s"],  # all POSTs answered: the rest is the worker catching up
                "web_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(WEB) - web0) / int(n),
                "worker_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(WORKER) - worker0) / int(n),
            }

        async def baseline(n: str = jobs) -> Figures:
            await baseline_redis.flushdb()  # arq keeps results an hour: start each round from an empty index
            worker0 = run.fleet.cpu_s(ARQ)
            figures = await load("arq", "--redis-url", run.svc.baseline_redis_url, "--jobs", n)
            return {
                "jobs_per_s": figures["jobs_per_s"],
                "worker_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(ARQ) - worker0) / int(n),
            }

        # One small untimed batch each: pools fill, code paths warm, before anything is timed.
        warm = str(max(1, s.jobs // 4))
        await outlast(warm)
        await baseline(warm)
        write_xacts.clear()
        await alternate(comparison, outlast, baseline, s.rounds)
        comparison.notes["write_transactions_per_job_rounds"] = write_xacts
        await _stop_outlast(run)
        await run.fleet.stop(ARQ)
        comparison.notes.update(await commits_per_job(run, admin))
        probe = await load("commits", "--database-url", run.svc.database_url, "--concurrency", concurrency)
        comparison.notes["db_commits_per_s"] = probe["commits_per_s"]
    finally:
        await _stop_outlast(run)
        await run.fleet.stop(ARQ)
        await baseline_redis.aclose()
        await admin.close()
    return comparison
