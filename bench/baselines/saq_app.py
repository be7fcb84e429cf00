"""SAQ, the peer a user would pick for Redis-backed asyncio jobs: a bare Starlette app and a SAQ worker.

- `POST /v1/jobs`: the body decoded with msgspec, `queue.enqueue(type)` (the noop, by the name in the body),
  the job's key in a 202, as the naive app answers; no database, no status row: SAQ keeps each job's record
  in Redis (its `incomplete` set until it ends), which is how the bench counts them.
- the worker: `python -m saq bench.baselines.saq_app.settings`, tuned as SAQ's README and benchmarks run it:
  `concurrency` 10 (its default; the README's example sets the same), the job's record as it comes (JSON,
  kept 600 s, timeout 10 s, no heartbeat), hiredis as redis-py picks it when installed, and uvloop as its
  loop, as Outlast's and the tuned arq worker run. SAQ never polls: each of the 10 slots waits on a
  blocking `BLMOVE`, the design its README contrasts with arq's poll. SAQ logs at WARNING by default (its
  CLI without `-v`): no line per job, where arq and Outlast write two.

Both read BENCH_SAQ_REDIS_URL (no default: a baseline must never find the machine's own Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import uvloop
from saq import Queue
from starlette.applications import Starlette
from starlette.requests import Request

from bench.baselines import bare_web

QUEUE = "default"  # SAQ's own default name: its keys are saq:default:…
INCOMPLETE_KEY = f"saq:{QUEUE}:incomplete"  # a job's id is here from enqueue until it ends
STATS_KEY = f"saq:{QUEUE}:stats"  # written by a worker as it starts: how the bench knows it is up
CONCURRENCY = 10


async def enqueue(request: Request, type: str) -> str:
    job = await request.app.state.queue.enqueue(type)
    return str(job.key)


def create_app() -> Starlette:
    url = os.environ["BENCH_SAQ_REDIS_URL"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.queue = Queue.from_url(url, name=QUEUE)
        await app.state.queue.connect()
        try:
            yield
        finally:
            await app.state.queue.disconnect()

    return bare_web.create_app(enqueue, lifespan)


async def noop(ctx: dict[str, Any]) -> None:
    return None


def _settings() -> dict[str, Any]:
    # saq's `start` makes its loop with asyncio.new_event_loop(), which the policy decides.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return {
        "queue": Queue.from_url(os.environ["BENCH_SAQ_REDIS_URL"], name=QUEUE),
        "functions": [noop],
        "concurrency": CONCURRENCY,
    }


settings = _settings  # saq calls a callable setting and reads the dict it returns
