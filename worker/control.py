"""What may be asked of a job after its submit: cancel it, or retry it as a new job. The API's routes
(server/jobs.py, server/submit.py) and the operator's `outlast jobs` (worker/tools/jobs_cli.py) both ask here, so a
job cancelled or retried either way goes through the same statements and rings the same doorbells."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from uuid import UUID

from uuid_utils.compat import uuid7

from worker import tracing
from worker.deps import Deps
from worker.job import JobType, Status
from worker.queue import request_abort
from worker.store import JobRow, NewJob, request_cancel

RETRYABLE: Final[frozenset[Status]] = frozenset({"failed", "cancelled", "expired"})


class NotRetryable(Exception):
    """The job is not in a state a retry starts from (409 in the API)."""


class TypeGone(Exception):
    """The job's type is no longer registered, so a retry would never run (422 in the API)."""


async def cancel(deps: Deps, tenant: str, job_id: UUID) -> JobRow | None:
    """Queued: cancelled at once. Running: its task is interrupted (arq abort, and the heartbeat as a fallback)
    and the job ends `cancelled`, unless it finishes first. None: unknown to `tenant`, or already done."""
    row = await request_cancel(deps.jobs, tenant, job_id)
    if row is not None and row.status == "running":
        await request_abort(deps.redis, row.id, row.attempt)
    return row


def retry_job(original: JobRow, tenant: str, job_types: Mapping[str, JobType], *, ttl_s: float) -> NewJob:
    """A new job from a failed, cancelled or expired one: its type, input, limits, metadata and callback, with
    `retry_of` naming it. The caller inserts and dispatches it as any submit."""
    if original.status not in RETRYABLE:
        raise NotRetryable(f"only a failed, cancelled or expired job can be retried; this one is {original.status}")
    job_type = job_types.get(original.type)
    if job_type is None:
        raise TypeGone(f"no job type {original.type!r} is registered any more")
    return NewJob(
        id=uuid7(),
        tenant=tenant,
        type=original.type,
        input=original.input.encode(),
        max_attempts=original.max_attempts,
        timeout_s=original.timeout_s,
        retry_safe=job_type.retry_safe,
        callback_url=original.callback_url,
        metadata=original.metadata.encode(),
        ttl_s=ttl_s,
        retry_of=original.id,
        priority=original.priority,  # the same job again: as urgent, under the same key; but it runs now
        concurrency_key=original.concurrency_key,
        traceparent=tracing.traceparent(),  # the retry request's span: a new job, a new trace of its own
    )
