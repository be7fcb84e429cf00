"""The dashboard's pages over 1,000,000 jobs (issue 18): the overview and a filtered jobs list, each against
`GET /v1/jobs?limit=50` on the same table, by the web process's CPU per answer.

The bench database gets 1,000,000 jobs of tenant `default` over the last 30 days (90 % succeeded, 7 % failed, the
rest cancelled), the newest 6,000 of them ended within the last hour, and 2,000 queued; each with a `customer` in
its metadata. All in one `INSERT … SELECT generate_series`, then VACUUM ANALYZE. One web process serves every side;
the pages carry the session cookie /ui/login gave the bench's key, the API list the key itself.

Each round, in an order that reverses every round: the baseline (`GET /v1/jobs?limit=50`), then the overview
(`GET /ui/`), then the list (`GET /ui/jobs` filtered by status and type, or by metadata, at random). The goal: each
page's server CPU per answer at most twice the list's. The issue's other half, 50 dashboards on the live feed under
the noop load, is bench/dashboard_feed.py.
"""

from __future__ import annotations

import os

import asyncpg
import httpx

from bench.compare import Comparison, Figures, Measure, Metric, alternate
from bench.run import Run, outlast_env

JOBS = int(os.environ.get("BENCH_DASHBOARD_JOBS", 1_000_000))  # fewer only for a quick look at the bench itself
RECENT, QUEUED = 6_000, 2_000
NAME = "dashboard-web"  # the process, and its log's name
METRICS = [
    Metric("cpu_us", "server CPU us per answer", higher_is_better=False, goal=2.0),
    Metric("p50_ms", "p50 ms", higher_is_better=False),
    Metric("rps", "answers/s", higher_is_better=True),
]
BASELINE = "GET /v1/jobs?limit=50 on the same table"
API_LIST = ["/v1/jobs?limit=50"]
OVERVIEW = ["/ui/"]
LISTS = ["/ui/jobs?status=failed&type=noop", "/ui/jobs?meta=customer%3Dc7", "/ui/jobs?status=cancelled"]

# Ids as uuid v7 makes them: the creation millisecond first, so they sort by time as Outlast's do.
_LOAD = """
INSERT INTO jobs (id, type, status, input, attempt, max_attempts, timeout_s, retry_safe, next_run_at, dispatched_at,
                  error, metadata, event_seq, created_at, started_at, finished_at, expires_at, lease_expires_at)
SELECT encode(overlay(uuid_send(gen_random_uuid())
                      PLACING substring(int8send((extract(epoch FROM created) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
              'hex')::uuid,
       'noop', status, '{}', CASE WHEN status = 'queued' THEN 0 ELSE 1 END, 3, 60, true, created, created,
       CASE WHEN status = 'failed' THEN '{"type": "boom", "message": "it failed", "retryable": false}'::jsonb END,
       jsonb_build_object('customer', 'c' || (i % 100)), 3, created,
       CASE WHEN status <> 'queued' THEN created END, CASE WHEN status <> 'queued' THEN created + interval '1 s' END,
       now() + interval '30 days', NULL
  FROM (SELECT i,
               CASE WHEN i > $1 - $2 - $3 THEN now() - interval '50 minutes' + (i - ($1 - $2 - $3)) * interval '400 ms'
                    ELSE now() - interval '30 days' + i * (interval '29 days' / $1) END AS created,
               CASE WHEN i > $1 - $3 THEN 'queued' WHEN i % 100 < 90 THEN 'succeeded' WHEN i % 100 < 97 THEN 'failed'
                    ELSE 'cancelled' END AS status
          FROM generate_series(1, $1) AS i) AS s
"""


async def load_jobs(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE jobs CASCADE")
        await conn.execute("TRUNCATE tenant_events")
        await conn.execute(_LOAD, JOBS, RECENT, QUEUED)
        await conn.execute("VACUUM ANALYZE jobs")
    finally:
        await conn.close()


async def session_cookie(url: str, api_key: str) -> str:
    """Signed in as a person is, at /ui/login: the `Cookie` header the pages then get."""
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/ui/login", data={"key": api_key, "next": "/ui/"})
        assert response.status_code == 303, response.text
        return "; ".join(f"{name}={value}" for name, value in client.cookies.items())


async def measure(run: Run) -> list[Comparison]:
    s = run.settings
    await load_jobs(run.svc.database_url)
    url = await run.fleet.outlast(NAME, outlast_env(run.svc))
    cookie = await session_cookie(url, run.api_key)
    try:

        def side(paths: list[str], name: str) -> Measure:
            listed = run.scratch / f"{name}.txt"
            listed.write_text("\n".join(paths))

            async def one() -> Figures:
                figures = await run.http_load(
                    "paths", NAME, url, "--paths", str(listed), "--cookie", cookie, expect=200
                )
                return {m.key: figures[m.key] for m in METRICS}

            return one

        overview = Comparison(
            "dashboard_overview",
            BASELINE,
            [Metric(m.key, f"GET /ui/ {m.label}", m.higher_is_better, m.goal) for m in METRICS],
        )
        lists = Comparison(
            "dashboard_list",
            BASELINE,
            [Metric(m.key, f"GET /ui/jobs?filters {m.label}", m.higher_is_better, m.goal) for m in METRICS],
        )
        for comparison in (overview, lists):
            comparison.notes.update(jobs=JOBS, recent=RECENT, queued=QUEUED, concurrency=s.concurrency)
        baseline = side(API_LIST, "api-list")
        await alternate(overview, side(OVERVIEW, "overview"), baseline, s.rounds)
        await alternate(lists, side(LISTS, "lists"), baseline, s.rounds)
        return [overview, lists]
    finally:
        await run.fleet.stop(NAME)
