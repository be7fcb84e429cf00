"""A status event: the SQL that logs one with every change of a job's status, and the type that reads it back.

Its data holds every field of the Job that a change can touch, as the change left them (the others never change),
so a replayed status event shows the job as it was then (worker/resource.py renders it as the Job). Events written
before a field existed lack it: those fields read as UNSET.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from worker.job import Error, Progress, Status


class StatusEvent(msgspec.Struct, frozen=True):
    """A `status` event's data as stored."""

    status: Status
    attempt: int
    error: Error | None = None  # the job's, or (for a retry) the failed attempt's
    progress: Progress | msgspec.UnsetType = msgspec.UNSET
    started_at: datetime | msgspec.UnsetType | None = msgspec.UNSET
    finished_at: datetime | msgspec.UnsetType | None = msgspec.UNSET
    next_run_at: datetime | None = None  # a retry's: when it runs again


decode = msgspec.json.Decoder(StatusEvent).decode


def insert_sql(relation: str, *, error: str = "error") -> str:
    """The INSERT that logs a status change of the rows in `relation` (a CTE of changed jobs), with the fields of
    StatusEvent. `error` may name a retried attempt's error, which the row itself does not keep."""
    return f"""
INSERT INTO job_events (job_id, seq, name, data)
SELECT id, event_seq, 'status',
       jsonb_build_object('status', status, 'attempt', attempt, 'error', {error}, 'progress', progress,
                          'started_at', started_at, 'finished_at', finished_at)
       || CASE WHEN status = 'queued' AND attempt > 0 AND isfinite(next_run_at)
               THEN jsonb_build_object('next_run_at', next_run_at)
               ELSE '{{}}' END  -- a parent waiting for its children is due never ('infinity'): no time to show
  FROM {relation}
"""
