"""Outlast's job engine: the jobs table, the queue, state changes, the sweep and the job types.

Both processes import it; the server uses only the names below.
"""

from worker import control, cron, database, events, keys, resource, schedules, status, store, sweep, ticker
from worker.config import Config, from_env
from worker.deps import Deps, connect
from worker.executors import Stopped, SyncContext
from worker.job import (
    LIVE,
    NEXT,
    TERMINAL,
    Child,
    Context,
    Error,
    Job,
    JobError,
    JobType,
    Links,
    Progress,
    Rate,
    RetryableError,
    Status,
    Waiting,
    in_process_pool,
)
from worker.job_types import load as load_job_types
from worker.queue import enqueue, request_abort
from worker.schedules import Schedule
from worker.webhooks import store as webhook_store
from worker.webhooks.ssrf import Forbidden, UrlGuard

__all__ = [
    "LIVE",
    "NEXT",
    "TERMINAL",
    "Child",
    "Config",
    "Context",
    "Deps",
    "Error",
    "Forbidden",
    "Job",
    "JobError",
    "JobType",
    "Links",
    "Progress",
    "Rate",
    "RetryableError",
    "Schedule",
    "Status",
    "Stopped",
    "SyncContext",
    "UrlGuard",
    "Waiting",
    "connect",
    "control",
    "cron",
    "database",
    "enqueue",
    "events",
    "from_env",
    "in_process_pool",
    "keys",
    "load_job_types",
    "request_abort",
    "resource",
    "schedules",
    "status",
    "store",
    "sweep",
    "ticker",
    "webhook_store",
]
