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

from arq import create_pool
from arq.connections import RedisSettings
from starlette.applications import Starlette
from starlette.requests import Request

from bench.baselines import bare_web


async def enqueue(request: Request, type: str) -> str:
    job = await request.app.state.arq.enqueue_job(type)
    return str(job.job_id)


def create_app() -> Starlette:
    settings = RedisSettings.from_dsn(os.environ["BENCH_BASELINE_REDIS_URL"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.arq = await create_pool(settings)
        try:
            yield
        finally:
            await app.state.arq.aclose()

    return bare_web.create_app(enqueue, lifespan)
