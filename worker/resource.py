"""The Job resource as clients see it (API.md), built from a jobs row: for GET, for a status event replayed as the
job was then, and for a webhook's body. Its links are the API's URLs; the web adds their read tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import msgspec

from worker import status
from worker.job import TERMINAL, Error, Job, Links, Progress
from worker.store import JobRow


def links(job_id: UUID) -> Links:
    base = f"/v1/jobs/{job_id}"
    return Links(self=base, events=f"{base}/events", result=f"{base}/result")


def as_job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        type=row.type,
        status=row.status,
        done=row.done,
        input=msgspec.Raw(row.input.encode()),
        progress=msgspec.json.decode(row.progress, type=Progress),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        timeout_s=row.timeout_s,
        result=None if row.result is None else msgspec.Raw(row.result.encode()),
        result_size=None if row.result_purged_at is not None else row.result_size,  # past retention: 410, as inline
        error=None if row.error is None else msgspec.json.decode(row.error, type=Error),
        callback_url=row.callback_url,
        metadata=msgspec.json.decode(row.metadata),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        expires_at=row.expires_at,
        retry_of=row.retry_of,
        run_at=row.run_at,
        priority=row.priority,
        concurrency_key=row.concurrency_key,
        links=links(row.id),
        workflow_id=row.workflow_id,
        step=row.step,
        parent_id=row.parent_id,
    )


class Retry(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a job went back to `queued`, and when it runs again."""

    next_run_at: datetime
    error: Error | None = None


class StatusJob(Job, frozen=True, kw_only=True, omit_defaults=True):
    """A `status` event's data as a stream shows it: the Job as it was right after the change, and for a retry,
    why and when."""

    retry: Retry | None = None


def _utc(value: datetime | None) -> datetime | None:
    # jsonb renders timestamps in the session's time zone; the API speaks UTC, as GET /v1/jobs/{id} does.
    return None if value is None else value.astimezone(UTC)


def status_job(row: JobRow, data: bytes, job_links: Links | None = None) -> StatusJob:
    """Render a status event as the Job it describes: the change's fields from the event, the rest (which never
    change) from the row, and `job_links` as the reader's GET would show them. The result (or its size, when the
    blob store keeps it) belongs to the `succeeded` event only: it is set by that change."""
    event = status.decode(data)
    job = as_job(row)
    fields = msgspec.structs.asdict(job)
    if job_links is not None:
        fields["links"] = job_links
    fields.update(
        status=event.status,
        done=event.status in TERMINAL,
        attempt=event.attempt,
        result=job.result if event.status == "succeeded" else None,
        result_size=job.result_size if event.status == "succeeded" else None,
        error=event.error if event.status in TERMINAL else None,
    )
    if event.progress is not msgspec.UNSET:
        fields["progress"] = event.progress
    if event.started_at is not msgspec.UNSET:
        fields["started_at"] = _utc(event.started_at)
    if event.finished_at is not msgspec.UNSET:
        fields["finished_at"] = _utc(event.finished_at)
    retry = None
    if event.status == "queued" and event.next_run_at is not None:
        retry = Retry(next_run_at=event.next_run_at.astimezone(UTC), error=event.error)
    return StatusJob(**fields, retry=retry)
