"""The design card done naively: Starlette + `databases` + arq with its defaults, the way a first version looks.

- `POST /v1/jobs`: `await request.json()`, one `INSERT` of a `queued` row through `databases`, one
  `enqueue_job("run_job", id)`, a JSONResponse with 202.
- the worker (`arq bench.baselines.naive.WorkerSettings`): only `functions`, `redis_settings` and a
  startup/shutdown hook for the `Database` set, so poll_delay 0.5 s, max_jobs 10, pickle, results kept an
  hour. `run_job` marks the row `running`, runs the noop, marks it `succeeded`: three commits per job, like
  Outlast's.
- `GET /v1/jobs/{id}`: one `SELECT` through `databases`, a JSONResponse.

Nothing else: no validation beyond what the code needs, no leases, no retries, no sweep, no events. Run the
web with `uvicorn --factory bench.baselines.naive:create_app`; both read BENCH_DATABASE_URL and
BENCH_NAIVE_REDIS_URL (no defaults: a baseline must never find the machine's own services).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from databases import Database
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TABLE = "naive_jobs"  # bench/noop_jobs.py reads it by this name
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id          uuid PRIMARY KEY,
    type        text NOT NULL,
    status      text NOT NULL DEFAULT 'queued',
    input       jsonb NOT NULL,
    result      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
)
"""
_INSERT = f"INSERT INTO {TABLE} (id, type, input) VALUES (:id, :type, CAST(:input AS jsonb))"
_SELECT = f"SELECT id, type, status, input, result, created_at, started_at, finished_at FROM {TABLE} WHERE id = :id"
_START = f"UPDATE {TABLE} SET status = 'running', started_at = now() WHERE id = :id"
_FINISH = f"UPDATE {TABLE} SET status = 'succeeded', result = 'null', finished_at = now() WHERE id = :id"


def _redis_settings() -> RedisSettings:
    return RedisSettings.from_dsn(os.environ["BENCH_NAIVE_REDIS_URL"])


# -- web --------------------------------------------------------------------------------------------


async def submit(request: Request) -> Response:
    body = await request.json()
    job_id = uuid.uuid4()
    values = {"id": job_id, "type": body["type"], "input": json.dumps(body.get("input", {}))}
    await request.app.state.db.execute(_INSERT, values)
    await request.app.state.redis.enqueue_job("run_job", str(job_id))
    return JSONResponse({"id": str(job_id), "status": "queued"}, status_code=202)


async def show(request: Request) -> Response:
    row = await request.app.state.db.fetch_one(_SELECT, {"id": uuid.UUID(request.path_params["id"])})
    if row is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    job = dict(row._mapping)
    return JSONResponse({k: str(v) if v is not None else None for k, v in job.items()})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.db = Database(os.environ["BENCH_DATABASE_URL"])
        await app.state.db.connect()
        await app.state.db.execute(SCHEMA)  # a first version's migrations
        app.state.redis = await create_pool(_redis_settings())
        try:
            yield
        finally:
            await app.state.redis.aclose()
            await app.state.db.disconnect()

    return Starlette(
        routes=[
            Route("/v1/jobs", submit, methods=["POST"]),
            Route("/v1/jobs/{id}", show, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


# -- worker -----------------------------------------------------------------------------------------


async def run_job(ctx: dict[str, Any], job_id: str) -> None:
    db: Database = ctx["db"]
    await db.execute(_START, {"id": uuid.UUID(job_id)})
    # the noop itself
    await db.execute(_FINISH, {"id": uuid.UUID(job_id)})


async def startup(ctx: dict[str, Any]) -> None:
    ctx["db"] = Database(os.environ["BENCH_DATABASE_URL"])
    await ctx["db"].connect()


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["db"].disconnect()


class WorkerSettings:
    functions = (run_job,)
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = _redis_settings()
