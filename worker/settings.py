"""WorkerSettings for `arq worker.settings.WorkerSettings`: arq's defaults pinned to ones that don't lie.

arq reads the class `__dict__`, so a subclass silently loses settings: never subclass it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from arq import cron, func

from worker import webhooks
from worker.config import from_env
from worker.job_types import load
from worker.queue import QUEUE, RUN_JOB, connect, deserialize, redis_settings, serialize
from worker.run import Runtime, run_job
from worker.sweep import sweep

config = from_env()  # arq imports this module by its dotted path: this is the worker's edge


async def startup(ctx: dict[str, Any]) -> None:
    logging.getLogger("outlast").setLevel(logging.INFO)
    stack = contextlib.AsyncExitStack()
    ctx["deps"] = await stack.enter_async_context(connect(config, redis=ctx["redis"]))
    ctx["runtime"] = Runtime(job_types=load(config.job_modules))
    await stack.enter_async_context(webhooks.serving(ctx["deps"]))  # deliveries on their own tasks, not arq's
    ctx["stack"] = stack


async def shutdown(ctx: dict[str, Any]) -> None:
    if "stack" in ctx:
        await ctx["stack"].aclose()


class WorkerSettings:
    functions = (func(run_job, name=RUN_JOB, timeout=config.max_timeout_s + 60, max_tries=1_000),)
    cron_jobs = (
        cron(sweep, second=set(range(0, 60, config.sweep_interval_s)), run_at_startup=True, unique=True, timeout=300),
    )
    on_startup = startup
    on_shutdown = shutdown
    queue_name = QUEUE
    redis_settings = redis_settings(config)
    max_jobs = config.worker_max_jobs
    poll_delay = config.worker_poll_delay_s  # the 0.5 s default is the floor of idle pickup latency
    health_check_interval = config.worker_health_check_interval_s  # the default says healthy an hour after kill -9
    job_timeout = config.max_timeout_s + 60  # never None: the per-job timeout_s is enforced inside run_job
    allow_abort_jobs = True  # cancelling a running job needs it
    job_serializer = serialize  # never pickle
    job_deserializer = deserialize
    keep_result = 0  # results live in Postgres, not in arq:result:* keys
    max_tries = 1_000  # Postgres counts attempts, not arq
