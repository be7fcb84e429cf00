"""arq tuned the way Outlast tunes it for throughput: poll_delay 0.05 s, max_jobs 100, and uvloop as its event
loop; everything else as it comes (pickle, results kept an hour, queue_read_limit 500). Run as
`arq bench.baselines.arq_tuned.WorkerSettings` with BENCH_BASELINE_REDIS_URL. The drain comparison preloads its
queue with `noop` jobs, then starts it.
"""

from __future__ import annotations

import asyncio
import os

import uvloop
from arq.connections import RedisSettings

from bench.baselines.arq_defaults import noop

asyncio.set_event_loop(uvloop.new_event_loop())  # as worker/settings.py does: arq takes the current loop


class WorkerSettings:
    functions = (noop,)
    poll_delay = 0.05
    max_jobs = 100
    # No default: a baseline must never find the machine's own Redis on 6379.
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_BASELINE_REDIS_URL"])
