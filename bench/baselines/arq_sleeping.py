"""arq tuned as bench/baselines/arq_tuned.py (poll_delay 0.05 s, uvloop, pickle), running jobs that only sleep: the
running-jobs baseline (bench/running.py). Run as `arq bench.baselines.arq_sleeping.WorkerSettings` with
BENCH_BASELINE_REDIS_URL, and BENCH_ARQ_MAX_JOBS for as many jobs at once as the bench runs.

`sleep` counts its start in one Redis key, once, so the bench knows when all are running; then it is arq's own
cost alone: a task asleep in one timer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import uvloop
from arq.connections import RedisSettings

asyncio.set_event_loop(uvloop.new_event_loop())  # as arq_tuned does: arq takes the current loop

FUNCTION = "sleep"
STARTED_KEY = "bench:sleeping:started"  # bench/running.py names both too: it must not import this module


async def sleep(ctx: dict[str, Any], seconds: float) -> None:
    await ctx["redis"].incr(STARTED_KEY)
    await asyncio.sleep(seconds)


class WorkerSettings:
    functions = (sleep,)
    poll_delay = 0.05
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "100"))
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_BASELINE_REDIS_URL"])
