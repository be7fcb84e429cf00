"""arq as it comes: only `functions` and `redis_settings` set, so poll_delay 0.5 s, max_jobs 10, pickle,
results kept an hour. Run as `arq bench.baselines.arq_defaults.WorkerSettings` with BENCH_BASELINE_REDIS_URL.

The function is named `noop` and enqueued by name, so the enqueuing side needs nothing from here.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings

FUNCTION = "noop"


async def noop(ctx: dict[str, Any]) -> None:
    return None


class WorkerSettings:
    functions = (noop,)
    # No default: a baseline must never find the machine's own Redis on 6379.
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_BASELINE_REDIS_URL"])
