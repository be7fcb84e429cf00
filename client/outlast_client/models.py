"""What the API speaks, as msgspec Structs: the Job (API.md), the events of its stream (docs/events.md), a job to
submit, a page of the list.

The client's own copy, not the server's: a service installs this package without the server. Unknown fields are
ignored, so a newer server's additions don't break an older client; tests/test_client.py decodes what the server
sends for every field, so the copy can't drift unnoticed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal
from uuid import UUID

import msgspec

# The six words of the API; the last four are terminal and `done` is true exactly for them.
Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
TERMINAL: Final[frozenset[str]] = frozenset({"succeeded", "failed", "cancelled", "expired"})


class Progress(msgspec.Struct, frozen=True):
    fraction: float = 0.0  # in [0, 1]
    message: str | None = None


class Error(msgspec.Struct, frozen=True):
    """Why a job ended without a result (`failed`, `cancelled`, `expired`)."""

    type: str
    message: str
    retryable: bool = False


class Links(msgspec.Struct, frozen=True):
    """The job's URLs; each carries a short-lived read token for this one job (`?token=…`)."""

    self: str
    events: str
    result: str


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """The Job resource."""

    id: UUID
    type: str
    status: Status
    done: bool
    input: Any
    progress: Progress
    attempt: int
    max_attempts: int
    timeout_s: int
    result: Any
    error: Error | None
    callback_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime
    retry_of: UUID | None = None  # made by retry() from that job
    run_at: datetime | None = None  # not started before then, as asked on submit
    priority: int = 0
    concurrency_key: str | None = None
    links: Links
    workflow_id: UUID | None = None  # a workflow step's job: its workflow and step
    step: str | None = None
    parent_id: UUID | None = None  # spawned by that job's code (ctx.spawn)
    # A result kept in the blob store: its size in bytes, `result` then None; read it with client.result(id)
    result_size: int | None = None


class JobPage(msgspec.Struct, frozen=True):
    items: list[Job]
    next_cursor: str | None = None


class JobItems(msgspec.Struct, frozen=True):
    items: list[Job]


class Retry(msgspec.Struct, frozen=True):
    """Why an attempt failed and when the next one runs (a status event that put the job back to `queued`)."""

    next_run_at: datetime
    error: Error | None = None


class StatusEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The job changed status: `job` is the Job as it was right after that change; the last one has `job.done`."""

    id: int  # the event's seq in the job's log: 1, 2, 3, … with no gap
    job: Job
    retry: Retry | None = None


class ProgressEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    fraction: float
    message: str | None = None


class LogEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A line the job logged with `ctx.log`."""

    id: int
    level: str  # debug, info, warning or error
    message: str


Event = StatusEvent | ProgressEvent | LogEvent


class StepEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow's step changed status (waiting, ready, running, succeeded, failed, cancelled)."""

    id: int  # the event's seq in the workflow's log
    step: str
    status: str


class WorkflowEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The workflow changed status; the stream ends after the one that ends it (`done`)."""

    id: int
    status: str
    error: dict[str, Any] | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


WorkflowStreamEvent = StepEvent | WorkflowEvent


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job to submit: the body of `POST /v1/jobs`, or one item of `submit_many`. A field left None is not sent,
    so the server's default applies (and a field this server does not know is not sent unless given)."""

    type: str
    input: Any = None  # None: not sent, which the server reads as `{}`
    callback_url: str | None = None
    metadata: dict[str, Any] | None = None
    timeout_s: int | None = None
    max_attempts: int | None = None
    run_at: datetime | None = None
    delay_s: float | None = None
    priority: int | None = None
    concurrency_key: str | None = None
    # A batch item carries its own in the body; a single submit sends it as the Idempotency-Key header. None: the
    # client makes one, kept across its retries, so a retried submit never makes a second job.
    idempotency_key: str | None = None


# -- workflows (docs/workflows.md) --------------------------------------------------------------------------------


class StepSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A step of a workflow to submit: a name, the job it runs, and the steps it comes `after` (or `map`s over)."""

    name: str
    type: str
    input: Any = None
    after: list[str] | None = None
    map: str | None = None  # one job per item of that step's list result
    metadata: dict[str, Any] | None = None
    max_attempts: int | None = None
    timeout_s: int | None = None
    priority: int | None = None


class StepState(msgspec.Struct, frozen=True):
    status: str  # waiting, ready, running, succeeded, failed or cancelled
    job_ids: list[UUID]  # a map's in item order
    counts: dict[str, int] = {}  # its jobs by status


class WorkflowLinks(msgspec.Struct, frozen=True):
    self: str


class Workflow(msgspec.Struct, frozen=True, kw_only=True):
    """The Workflow resource: `running`, then `succeeded`, `failed` or `cancelled` (`done` for the last three)."""

    id: UUID
    status: str
    done: bool
    steps: dict[str, StepState]
    metadata: dict[str, Any]
    error: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None
    links: WorkflowLinks
    callback_url: str | None = None  # gets the final Workflow as a signed webhook
