"""The floor for GET /v1/jobs/{id}: bare Starlette, one asyncpg SELECT by primary key, msgspec encode.

Run as `uvicorn --factory bench.baselines.raw_poll:create_app` with BENCH_DATABASE_URL naming the bench
database. No validation, no problem+json, no resource shaping: whatever Outlast spends beyond this is what
its layers cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# The columns Outlast's show reads (worker/store.py), so both sides move the same bytes out of Postgres.
_SELECT = """
SELECT id, type, status, input, progress, attempt, max_attempts, timeout_s, result, result_purged_at, error,
       callback_url, metadata, created_at, started_at, finished_at, expires_at
  FROM jobs WHERE id = $1 AND tenant_id = 'default'
"""
# asyncpg hands jsonb over as text: embed it as JSON rather than as a quoted string, as Outlast's answer does.
_JSONB = frozenset({"input", "progress", "result", "error", "metadata"})
_encode = msgspec.json.Encoder().encode
POOL_MAX = 10  # Outlast's default OUTLAST_DB_POOL_MAX: the same number of connections on both sides


async def show(request: Request) -> Response:
    try:
        job_id = UUID(request.path_params["id"])
    except ValueError:
        return Response(status_code=404)
    record = await request.app.state.pool.fetchrow(_SELECT, job_id)
    if record is None:
        return Response(status_code=404)
    return Response(_encode(row_body(record)), media_type="application/json")


def row_body(record: asyncpg.Record) -> dict[str, object]:
    return {k: msgspec.Raw(v.encode()) if k in _JSONB and v is not None else v for k, v in record.items()}


async def no_reset(connection: asyncpg.Connection) -> None:
    """asyncpg's pool resets a connection's session on release by default (`SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`): a second statement and round trip per query. Outlast skips it
    (worker/queue.py), and the floor does "one SELECT", so it skips it too."""


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def create_app() -> Starlette:
    dsn = os.environ["BENCH_DATABASE_URL"]  # no default: a baseline must never find the machine's own database

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=POOL_MAX, reset=no_reset) as pool:
            app.state.pool = pool
            yield

    return Starlette(
        routes=[Route("/v1/jobs/{id}", show, methods=["GET"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )
