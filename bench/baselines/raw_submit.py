"""The floor for POST /v1/jobs: bare Starlette, one asyncpg INSERT, one Redis LPUSH, msgspec encode.

Run as `uvicorn --factory bench.baselines.raw_submit:create_app` with BENCH_DATABASE_URL naming the bench
database and BENCH_BASELINE_REDIS_URL a Redis index of its own. It inserts into the same `jobs` table
(so the same indexes are kept up), returns the same columns Outlast's answer is built from, and pushes the
id on a Redis list. No validation beyond decoding `type`, no event row, no arq: whatever Outlast spends
beyond this is what its layers cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import asyncpg
import msgspec
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uuid_utils.compat import uuid7

from bench.baselines.raw_poll import POOL_MAX, no_reset, row_body

QUEUE = "raw_submit:queue"
_INSERT = """
INSERT INTO jobs (id, type, input, max_attempts, timeout_s, retry_safe, expires_at, dispatched_at)
VALUES ($1, $2, $3, 3, 60, true, now() + interval '7 days', now())
RETURNING id, type, status, input, progress, attempt, max_attempts, timeout_s, result, result_purged_at, error,
          callback_url, metadata, created_at, started_at, finished_at, expires_at
"""


class Body(msgspec.Struct):
    type: str
    input: msgspec.Raw = msgspec.Raw(b"{}")


_decode = msgspec.json.Decoder(Body).decode
_encode = msgspec.json.Encoder().encode


async def submit(request: Request) -> Response:
    body = _decode(await request.body())
    record = await request.app.state.pool.fetchrow(_INSERT, uuid7(), body.type, bytes(body.input).decode())
    await request.app.state.redis.lpush(QUEUE, str(record["id"]))
    return Response(_encode(row_body(record)), status_code=202, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def create_app() -> Starlette:
    dsn = os.environ["BENCH_DATABASE_URL"]  # no defaults: a baseline must never find the machine's own services
    redis_url = os.environ["BENCH_BASELINE_REDIS_URL"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.redis = Redis.from_url(redis_url)
        try:
            async with asyncpg.create_pool(dsn, min_size=1, max_size=POOL_MAX, reset=no_reset) as pool:
                app.state.pool = pool
                yield
        finally:
            await app.state.redis.aclose()

    return Starlette(
        routes=[Route("/v1/jobs", submit, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )
