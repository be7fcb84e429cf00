"""The Python client of the Outlast job server (docs/client.md).

from outlast_client import Client
with Client() as outlast:                       # $OUTLAST_URL and $OUTLAST_API_KEY
    job = outlast.submit("square_sum", {"data": [1, 2, 3]})
    print(outlast.wait(job.id).status, outlast.result(job.id))
"""

from outlast_client.aio import AsyncClient
from outlast_client.errors import (
    APIError,
    Conflict,
    FieldError,
    Forbidden,
    Gone,
    IdempotencyKeyReused,
    InvalidInput,
    JobFailed,
    JobNotDone,
    NotFound,
    OutlastError,
    Problem,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    UnknownJobType,
    Unreachable,
)
from outlast_client.models import (
    TERMINAL,
    Error,
    Event,
    Job,
    JobSpec,
    Links,
    LogEvent,
    Progress,
    ProgressEvent,
    Retry,
    Status,
    StatusEvent,
    StepSpec,
    StepState,
    Workflow,
)
from outlast_client.sync import Client

__all__ = [
    "TERMINAL",
    "APIError",
    "AsyncClient",
    "Client",
    "Conflict",
    "Error",
    "Event",
    "FieldError",
    "Forbidden",
    "Gone",
    "IdempotencyKeyReused",
    "InvalidInput",
    "Job",
    "JobFailed",
    "JobNotDone",
    "JobSpec",
    "Links",
    "LogEvent",
    "NotFound",
    "OutlastError",
    "Problem",
    "Progress",
    "ProgressEvent",
    "RateLimited",
    "Retry",
    "ServerError",
    "Status",
    "StatusEvent",
    "StepSpec",
    "StepState",
    "Unauthorized",
    "Unavailable",
    "UnknownJobType",
    "Unreachable",
    "Workflow",
]
