"""What arq's Worker is given: arq's defaults pinned to ones that don't lie, for the deployment's worker
(worker/settings.py, `arq worker.settings.WorkerSettings`) and the tests' in-process ones alike.

    worker_options(config)   every Worker argument, startup and shutdown included
    instance_name(config)    names this worker's health key for `arq --check`, and its row in `workers`
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from arq import func
from arq.connections import RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import egress, logs, metrics, notify, tracing, wake
from worker.capacity import refresh
from worker.config import Config
from worker.connections import QUEUE, deserialize, redis_settings, serialize
from worker.deps import connect
from worker.job import shut_process_pool
from worker.job_types import load
from worker.queue import RUN_JOB, arq_job_timeout_s
from worker.run import Runtime, after_job_end, run_job
from worker.schedules import declared
from worker.sweep import fresh_s, sweeping
from worker.ticker import ticking
from worker.webhooks import deliver as webhooks


def instance_name(config: Config, environ: Mapping[str, str] = os.environ) -> str:
    """OUTLAST_WORKER_NAME, else the platform's instance name, else the host name."""
    for name in (config.worker_name, *(environ.get(v, "") for v in ("DYNO", "FLY_MACHINE_ID", "RENDER_INSTANCE_ID"))):
        if name:
            return name
    return socket.gethostname()


def _redis_settings(config: Config) -> RedisSettings:
    """Commands retry through a Redis outage of about `redis_outage_s`, so running jobs (which need only
    PostgreSQL) finish instead of dying with the process; past it, arq raises and the worker exits non-zero."""
    settings = redis_settings(config)
    settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=max(1, int(config.redis_outage_s / 2)))
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    return settings


async def startup(ctx: dict[str, Any]) -> None:
    """Connect, and start what runs beside arq's job slots: webhook deliveries, the sweep and the ticker."""
    config: Config = ctx["config"]
    logs.configure(config.log_format, worker=instance_name(config))
    tracing.setup(config, service="outlast-worker")
    logging.getLogger("outlast").setLevel(logging.INFO)
    stack = contextlib.AsyncExitStack()
    stack.callback(shut_process_pool)
    stack.push_async_callback(egress.aclose)  # ctx.http's connections
    ctx["deps"] = deps = await stack.enter_async_context(connect(config, redis=ctx["redis"]))
    # An idle worker's poll waits for the doorbell (worker/wake.py) rather than polling 20 times a second.
    ctx[wake.CTX_KEY] = await stack.enter_async_context(wake.listening(config, instance_name(config)))
    ctx["runtime"] = runtime = Runtime.of(deps, load(config.job_modules), name=instance_name(config))
    stack.push_async_callback(runtime.aclose)
    ear = await stack.enter_async_context(notify.hearing(deps))  # what wakes the webhook loop and the ticker
    await stack.enter_async_context(webhooks.serving(deps, ear))  # deliveries on their own tasks, not arq's
    ctx["metrics_port"] = await stack.enter_async_context(metrics.serving(config.worker_metrics_port))
    # Before the first claim, so that tenants' default cap is in force from it on.
    await refresh(deps.db, runtime.capacity, fresh_s=fresh_s(config))
    # Its own task too: it must run when every slot is taken. Each pass tells the others this worker's slots.
    await stack.enter_async_context(sweeping(deps, runtime.capacity))
    # Cron schedules' ticks, on a task of their own for the same reason; the code's SCHEDULES are written first.
    await stack.enter_async_context(
        ticking(deps, ear, runtime.job_types, declared(config.job_modules, runtime.job_types))
    )
    ctx["stack"] = stack


async def shutdown(ctx: dict[str, Any]) -> None:
    if "stack" in ctx:
        await ctx["stack"].aclose()


def worker_options(config: Config) -> dict[str, Any]:
    """Every argument of arq's Worker for this deployment. A dict, which arq reads as it reads a settings class's
    `__dict__` (a class would silently lose its settings to a subclass)."""
    return {
        "functions": [func(run_job, name=RUN_JOB, timeout=arq_job_timeout_s(config.max_timeout_s), max_tries=1_000)],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "after_job_end": after_job_end,
        "ctx": {"config": config},
        "queue_name": QUEUE,
        "redis_settings": _redis_settings(config),
        # Per instance: a sibling's graceful stop deletes its own key, never ours.
        "health_check_key": f"{QUEUE}:health-check:{instance_name(config)}",
        "max_jobs": config.worker_max_jobs,
        # A busy worker's pause between polls (arq's 0.5 s default would cap its pickup); idle, it waits for the
        # doorbell (worker/wake.py).
        "poll_delay": config.worker_poll_delay_s,
        "health_check_interval": config.worker_health_check_interval_s,  # arq's says healthy an hour after kill -9
        "job_timeout": arq_job_timeout_s(config.max_timeout_s),  # never None: the job's timeout_s is run_job's
        "allow_abort_jobs": True,  # cancelling a running job needs it
        "job_serializer": serialize,  # never pickle
        "job_deserializer": deserialize,
        "keep_result": 0,  # results live in PostgreSQL, not in arq:result:* keys
        "max_tries": 1_000,  # PostgreSQL counts attempts, not arq
        "retry_jobs": False,  # an interrupted attempt is handed back through PostgreSQL, never re-run by arq
        # SIGTERM: stop claiming, give running jobs this long, then cancel them (run.py hands them back).
        "job_completion_wait": config.shutdown_grace_s,
    }
