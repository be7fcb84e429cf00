"""Outlast's job engine: the jobs table, the queue, state changes, the sweep and the job types.

Both processes import it; the server uses only the names below.
"""

from worker import events, store
from worker.config import Config, from_env
from worker.events import Hub
from worker.job import (
    LIVE,
    NEXT,
    TERMINAL,
    Context,
    Error,
    Job,
    JobError,
    JobType,
    Progress,
    RetryableError,
    Status,
)
from worker.job_types import load as load_job_types
from worker.queue import Deps, connect, enqueue

__all__ = [
    "LIVE",
    "NEXT",
    "TERMINAL",
    "Config",
    "Context",
    "Deps",
    "Error",
    "Hub",
    "Job",
    "JobError",
    "JobType",
    "Progress",
    "RetryableError",
    "Status",
    "connect",
    "enqueue",
    "events",
    "from_env",
    "load_job_types",
    "store",
]
