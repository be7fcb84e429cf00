"""procrastinate, the peer a user would pick for PostgreSQL-only jobs: a bare Starlette app and its worker.

- `POST /v1/jobs`: the body decoded with msgspec, `defer_async()` of the task the body names (the noop), the
  job's id in a 202, as the naive app answers. procrastinate keeps every job as a row of
  `procrastinate_jobs` (`todo` → `doing` → `succeeded`, kept: `delete_jobs` as it comes, never), which is how
  the bench counts them, and its events in `procrastinate_events`, which time the drain.
- the worker: `python -m bench.baselines.procrastinate_worker` (`work` below), tuned as procrastinate's docs
  advise for short async jobs: 10 sub-workers (`concurrency`; its default is 1, see "Execute multiple jobs at
  the same time"), a pool of concurrency + 1 connections ("Mind the size of your PostgreSQL pool": the shorter
  the jobs, the more the pool needs as many connections as the concurrency, plus one), LISTEN/NOTIFY on (its
  default: a deferred job wakes a waiting sub-worker), and uvloop as its loop, as Outlast's and the tuned arq
  worker run. No logging is configured, as its CLI without `--verbose`: no line per job.
- the web's pool: 10 connections, Outlast's default (`OUTLAST_DB_POOL_MAX`).

Its schema lives in a database of its own on the bench's PostgreSQL (`prepare`). Both processes read
BENCH_PROCRASTINATE_DATABASE_URL (no default: a baseline must never find the machine's own services).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
from procrastinate import App, PsycopgConnector
from procrastinate.schema import SchemaManager
from starlette.applications import Starlette
from starlette.requests import Request

from bench.baselines import bare_web

TABLE = "procrastinate_jobs"  # bench/noop_jobs.py counts succeeded rows here
CONCURRENCY = 10
WEB_POOL = 10


def make(pool_size: int) -> App:
    app = App(connector=PsycopgConnector(conninfo=os.environ["BENCH_PROCRASTINATE_DATABASE_URL"], max_size=pool_size))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app


async def prepare(database_url: str) -> None:
    """procrastinate's schema, as `procrastinate schema --apply` writes it, in the (new, empty) database."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SchemaManager.get_schema())
    finally:
        await conn.close()


async def enqueue(request: Request, type: str) -> int:
    app: App = request.app.state.procrastinate
    return await app.configure_task(type).defer_async()


def create_app() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with make(WEB_POOL).open_async() as app.state.procrastinate:
            yield

    return bare_web.create_app(enqueue, lifespan)


async def work() -> None:
    async with make(CONCURRENCY + 1).open_async() as app:
        await app.run_worker_async(concurrency=CONCURRENCY)  # until SIGTERM, which it takes as a graceful stop
