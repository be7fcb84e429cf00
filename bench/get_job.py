"""GET /v1/jobs/{id}: Outlast's web process against bench/baselines/raw_poll.py, under the same load.

Both read the same succeeded rows at random from the same database, each as one uvicorn process with the
same flags; only one of them is under load at a time.
"""

from __future__ import annotations

import asyncpg
from uuid_utils.compat import uuid7

from bench.compare import Comparison, Figures, Measure, Metric, alternate
from bench.procs import load
from bench.run import Run, outlast_env

_SEED = """
INSERT INTO jobs (id, type, status, input, attempt, max_attempts, timeout_s, retry_safe, progress, result,
                  started_at, finished_at, expires_at, event_seq)
VALUES ($1, 'noop', 'succeeded', '{}', 1, 3, 60, true, '{"fraction": 1.0, "message": null}', 'null',
        now(), now(), now() + interval '7 days', 3)
"""
OUTLAST, BASELINE = "get-outlast", "get-raw-poll"  # process names, and their logs' names
METRICS = [
    Metric("rps", "GET /v1/jobs/{id} req/s", higher_is_better=True),
    Metric("p50_ms", "GET /v1/jobs/{id} p50 ms", higher_is_better=False),
    Metric("p99_ms", "GET /v1/jobs/{id} p99 ms", higher_is_better=False),
    # The server's own CPU per answer: steadier than req/s where client and server share few cores.
    Metric("cpu_us", "GET /v1/jobs/{id} server CPU us/req", higher_is_better=False),
]


async def seed(database_url: str, n: int) -> list[str]:
    """n succeeded noop jobs, written straight into the table (their history is not what is measured)."""
    ids = [uuid7() for _ in range(n)]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE jobs CASCADE")
        await conn.executemany(_SEED, [(i,) for i in ids])
        await conn.execute("ANALYZE jobs")
    finally:
        await conn.close()
    return [str(i) for i in ids]


async def measure(run: Run) -> Comparison:
    s = run.settings
    ids_file = run.scratch / "ids.txt"
    ids_file.write_text("\n".join(await seed(run.svc.database_url, s.seed_jobs)))
    env = outlast_env(run.svc)
    outlast_url = await run.fleet.web(OUTLAST, "server.app:create_app", env)
    baseline_url = await run.fleet.web(
        BASELINE, "bench.baselines.raw_poll:create_app", {**env, "BENCH_DATABASE_URL": run.svc.database_url}
    )

    def side(name: str, url: str) -> Measure:
        async def one() -> Figures:
            args = ["--ids", str(ids_file), "--concurrency", str(s.concurrency)]
            args += ["--warmup", str(s.warmup_s), "--duration", str(s.duration_s)]
            cpu0 = run.fleet.cpu_s(name)
            figures = await load("get", "--url", url, *args)
            figures["cpu_us"] = 1e6 * (run.fleet.cpu_s(name) - cpu0) / figures["served"]
            if figures["errors"]:
                raise RuntimeError(f"{url} answered {figures['errors']} requests with other than 200")
            return {m.key: figures[m.key] for m in METRICS}

        return one

    comparison = Comparison("get_job", "raw_poll: Starlette + asyncpg SELECT + msgspec", METRICS)
    comparison.notes.update(seed_jobs=s.seed_jobs, concurrency=s.concurrency, duration_s=s.duration_s)
    try:
        return await alternate(comparison, side(OUTLAST, outlast_url), side(BASELINE, baseline_url), s.rounds)
    finally:
        await run.fleet.stop(OUTLAST)
        await run.fleet.stop(BASELINE)
