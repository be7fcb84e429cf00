"""A running attempt's heartbeat: its lease renewed every lease/3, the latest progress its code reported written at
most every `OUTLAST_PROGRESS_INTERVAL_S`, and its task stopped when the row says it was superseded or cancelled.

    Heartbeat(deps, claimed, task, leased_at)
      .start()      arm the first beat, a third of the lease after the claim was sent
      .report(p)    ctx.progress: remember the latest value (and beat at once, if no beat runs yet)
      .stop()       the attempt is over: no more beats
      .stopped      why it stopped the task, if it did: "superseded" or "cancelled"

A beat's task starts only at the first progress report or a third of the lease in, whichever comes first: most jobs
that end sooner never need one (its task and timers were a tenth of a noop job's CPU).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal
from uuid import UUID

from worker import database, sql, store
from worker.claim import Claimed
from worker.database import storable
from worker.deps import Deps
from worker.job import Progress

log = logging.getLogger("outlast.worker")

_HEARTBEAT = """
WITH beat AS (
    UPDATE jobs
       SET lease_expires_at = now() + make_interval(secs => :lease),
           progress = COALESCE(CAST(:progress AS jsonb), progress),
           event_seq = event_seq + CASE WHEN CAST(:progress AS jsonb) IS NULL THEN 0 ELSE 1 END
     WHERE id = :id AND attempt = :attempt AND status = 'running'
    RETURNING id, event_seq, progress, cancel_requested_at
), event AS (
    INSERT INTO job_events (job_id, seq, name, data)
    SELECT id, event_seq, 'progress', progress FROM beat WHERE CAST(:progress AS jsonb) IS NOT NULL
)
SELECT cancel_requested_at IS NOT NULL AS cancel FROM beat
"""


Beat = Literal["renewed", "cancel", "superseded"]


async def heartbeat(jobs: store.Jobs, job_id: UUID, attempt: int, *, lease_s: float, progress: Progress | None) -> Beat:
    """Extend the lease and write the latest progress: `renewed`; `cancel`: renewed, but a cancel was asked for;
    `superseded`: this attempt is no longer the job's running one (a newer attempt owns it, or it ended)."""
    values = {
        "id": job_id,
        "attempt": attempt,
        "lease": lease_s,
        "progress": None if progress is None else storable(progress),
    }
    record = await sql.fetch_one(jobs.db, _HEARTBEAT, values)
    if record is None:
        return "superseded"
    if progress is not None:
        jobs.changed([job_id])
    return "cancel" if record["cancel"] else "renewed"


class Heartbeat:
    def __init__(self, deps: Deps, claimed: Claimed, task: asyncio.Future[Any], *, leased_at: float) -> None:
        self._deps, self._claimed, self._task = deps, claimed, task
        self._leased_at = leased_at  # when the claim was sent: no later than the database started the lease
        self._interval = deps.config.lease_s / 3
        self._latest: Progress | None = None  # reported and not yet written
        self._written_at = 0.0
        self._changed = asyncio.Event()
        self._first: asyncio.TimerHandle | None = None
        self._beating: asyncio.Task[None] | None = None
        self.message: str | None = None  # the last message reported, kept for the final progress
        self.stopped: Literal["superseded", "cancelled"] | None = None

    def start(self) -> None:
        delay = max(0.0, self._leased_at + self._interval - time.monotonic())
        self._first = asyncio.get_running_loop().call_later(delay, self._begin)

    def report(self, progress: Progress) -> None:
        self._latest = progress
        self.message = progress.message
        self._changed.set()
        self._begin()

    @property
    def unwritten(self) -> Progress | None:
        """The latest progress reported and not yet written, for the statement that ends the run to write."""
        return self._latest

    def stop(self) -> None:
        if self._first is not None:
            self._first.cancel()
        if self._beating is not None:
            self._beating.cancel()

    def _begin(self) -> None:
        if self._beating is None and not self._task.done():
            self._beating = asyncio.create_task(self._beat())

    def _halt(self, why: Literal["superseded", "cancelled"]) -> None:
        self.stopped = why
        self._task.cancel()

    async def _beat(self) -> None:
        config, claimed = self._deps.config, self._claimed
        renewed_at = self._leased_at  # when the request that last extended the lease was sent
        next_beat = renewed_at + self._interval
        while not self._task.done():
            now = time.monotonic()
            wake = next_beat
            if self._latest is not None:
                wake = min(wake, self._written_at + config.progress_interval_s)
            if wake > now:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wake - now)
                except TimeoutError:
                    pass
                continue
            progress, self._latest = self._latest, None
            sent_at = time.monotonic()
            try:
                verdict = await heartbeat(
                    self._deps.jobs, claimed.id, claimed.attempt, lease_s=config.lease_s, progress=progress
                )
            except Exception as exc:  # the task must outlive any failed write: it alone keeps the lease
                retry_in = min(self._interval, 1.0)
                if time.monotonic() + retry_in >= renewed_at + config.lease_s:
                    # The lease runs out before the next try: the sweep may hand the job to another worker from then
                    # on, so this attempt stops now rather than run beside the next (its writes would be refused).
                    log.warning("job %s attempt %d: lease lost (%s); stopping it", claimed.id, claimed.attempt, exc)
                    self._halt("superseded")
                    return
                if isinstance(exc, database.UNAVAILABLE):
                    log.warning("heartbeat %s: database unavailable (%s)", claimed.id, exc)
                    self._latest = self._latest or progress
                else:  # refused: the progress it carried may be why, so the next beat goes without it
                    log.exception("heartbeat %s: the write was refused; its progress is dropped", claimed.id)
                next_beat = time.monotonic() + retry_in
                continue
            renewed_at = sent_at
            self._written_at = time.monotonic()
            next_beat = self._written_at + self._interval
            if verdict != "renewed":
                self._halt("superseded" if verdict == "superseded" else "cancelled")
                return
