"""S6's floor: bare Starlette whose `POST /v1/jobs` calls arq's `enqueue_job`, for the bare tuned arq worker.

- `POST /v1/jobs`: the body decoded with msgspec, `enqueue_job(type)` (the noop, by the name in the body), its
  id in a 202, as the naive app answers; no database, no validation, no status row.
- the worker is `bench/baselines/arq_tuned.py` (poll 0.05 s, max_jobs 100, uvloop, pickle, results kept an
  hour): a job is done when arq's result key for its id exists, which is how the bench counts them.

Run with `uvicorn --factory bench.baselines.arq_web:create_app` and BENCH_BASELINE_REDIS_URL (no default: a
baseline must never find the machine's own Redis).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import msgspec
from arq import create_pool
from arq.connections import RedisSettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Body(msgspec.Struct):
    type: str


_decode = msgspec.json.Decoder(Body).decode
_encode = msgspec.json.Encoder().encode


async def submit(request: Request) -> Response:
    job = await request.app.state.arq.enqueue_job(_decode(await request.body()).type)
    return Response(_encode({"id": job.job_id, "status": "queued"}), status_code=202, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def create_app() -> Starlette:
    settings = RedisSettings.from_dsn(os.environ["BENCH_BASELINE_REDIS_URL"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.arq = await create_pool(settings)
        try:
            yield
        finally:
            await app.state.arq.aclose()

    return Starlette(
        routes=[Route("/v1/jobs", submit, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )
