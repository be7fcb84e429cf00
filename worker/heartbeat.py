"""Every running attempt's lease, progress and log lines, written by one task per worker process in one guarded
statement per tick, whatever the number of attempts.

    Pulse(deps)                              one per worker process (Runtime.pulse): the writer
      .attach(claimed, task, leased_at)      an attempt starts: its Heartbeat
    Heartbeat
      .report(p)         ctx.progress: the latest value, written at the next tick
      .log(level, m)     ctx.log: a line, written at the next tick after what the code reported before it
      .around(job)       run the job's code; its last log lines are written before this returns
      .stop()            the attempt is over: no more writes for it
      .stopped           why the pulse stopped its task, if it did: "superseded" or "cancelled"

A tick writes, for the attempts that need it, the lease (every `OUTLAST_LEASE_S`/3 at the latest), their
progress and log lines as events in the order the code reported them (consecutive progress reports collapse into
the latest), at most every `OUTLAST_PROGRESS_INTERVAL_S`. Each row is fenced by its attempt: an attempt the
statement did not find running is superseded, and one whose row asks for a cancel is cancelled, both stopped here.
An attempt that ends within a third of its lease and logs nothing is never written at all: most noop jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar
from uuid import UUID

from worker import database, sql, store
from worker.claim import Claimed
from worker.database import storable
from worker.deps import Deps
from worker.job import LOG_LEVELS, LogLevel, Progress

log = logging.getLogger("outlast.worker")
T = TypeVar("T")
LOG_MAX_CHARS = 2_000  # a longer log message is cut
LOG_MAX_PENDING = 100  # log lines of one attempt waiting for a write; more are dropped and counted
# Renewing a lease early, in a write that goes anyway, costs a row; renewing it in its own write costs a statement.
EARLY_RENEWAL = 0.5  # of the renewal interval: a lease at least this far along is renewed with the others

_BEAT = """
WITH wanted AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]), CAST(:counts AS int[]),
                         CAST(:progress AS jsonb[])) AS w(id, attempt, n, progress)
), beat AS (
    UPDATE jobs
       SET lease_expires_at = now() + make_interval(secs => :lease),
           progress = COALESCE(w.progress, jobs.progress),
           event_seq = jobs.event_seq + w.n
      FROM wanted w
     WHERE jobs.id = w.id AND jobs.attempt = w.attempt AND jobs.status = 'running'
    RETURNING jobs.id, jobs.event_seq, w.n, jobs.cancel_requested_at
), event AS (
    INSERT INTO job_events (job_id, seq, name, data)
    SELECT b.id, b.event_seq - b.n + e.k, e.name, e.data
      FROM beat b
      JOIN unnest(CAST(:event_ids AS uuid[]), CAST(:event_ks AS int[]), CAST(:event_names AS text[]),
                  CAST(:event_data AS jsonb[])) AS e(id, k, name, data) ON e.id = b.id
)
SELECT id, cancel_requested_at IS NOT NULL AS cancel FROM beat
"""

Event = tuple[Literal["progress", "log"], Any]  # (name, its data: a Progress, or a log line's dict)
Verdict = Literal["renewed", "cancel"]


async def beat_many(
    jobs: store.Jobs, attempts: Sequence[tuple[UUID, int, Sequence[Event]]], *, lease_s: float
) -> dict[UUID, Verdict]:
    """Extend the leases of these running attempts and append their events, in one statement: each found running
    answers `renewed`, or `cancel` when a cancel was asked for; one missing is no longer its job's running attempt."""
    ids, numbers, counts, progress = [], [], [], []
    event_ids, event_ks, event_names, event_data = [], [], [], []
    for job_id, attempt, events in sorted(attempts, key=lambda a: a[0]):  # rows locked in one order
        ids.append(job_id)
        numbers.append(attempt)
        counts.append(len(events))
        last = None
        for k, (name, data) in enumerate(events, 1):
            encoded = storable(data)
            last = encoded if name == "progress" else last
            event_ids.append(job_id)
            event_ks.append(k)
            event_names.append(name)
            event_data.append(encoded)
        progress.append(last)
    values = {
        "ids": ids,
        "attempts": numbers,
        "counts": counts,
        "progress": progress,
        "lease": lease_s,
        "event_ids": event_ids,
        "event_ks": event_ks,
        "event_names": event_names,
        "event_data": event_data,
    }
    rows = await sql.fetch_all(jobs.db, _BEAT, values)
    jobs.changed({job_id for job_id, _, events in attempts if events})
    return {row["id"]: "cancel" if row["cancel"] else "renewed" for row in rows}


class Heartbeat:
    """One running attempt, as the pulse writes it."""

    def __init__(self, pulse: Pulse, claimed: Claimed, *, leased_at: float) -> None:
        self.id, self.attempt = claimed.id, claimed.attempt
        self._pulse = pulse
        self.renewed_at = leased_at  # when the write that last extended the lease was sent (or the claim)
        self.events: list[tuple[Literal["progress", "log"], Any]] = []  # reported, not yet written, in order
        self.dropped = 0
        self.urgent: asyncio.Future[None] | None = None  # set by around(): its last lines are to be written now
        self.task: asyncio.Future[Any] | None = None  # the job's code, stopped when its attempt is
        self.over = False  # the job's code returned: a line a task it left behind writes now is not written
        self.message: str | None = None  # the last message reported, kept for the final progress
        self.stopped: Literal["superseded", "cancelled"] | None = None

    def report(self, progress: Progress) -> None:
        self.message = progress.message
        if self.events and self.events[-1][0] == "progress":
            self.events[-1] = ("progress", progress)  # only the latest of a run of reports is written
        else:
            self.events.append(("progress", progress))
        self._pulse.due_soon()

    def log(self, level: LogLevel, message: str) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(sorted(LOG_LEVELS))}, not {level!r}")
        if self.over:
            return
        if sum(name == "log" for name, _ in self.events) >= LOG_MAX_PENDING:
            self.dropped += 1
            return
        if len(message) > LOG_MAX_CHARS:
            message = message[: LOG_MAX_CHARS - 1] + "…"
        self.events.append(("log", {"level": level, "message": message}))
        self._pulse.due_soon()

    @property
    def unwritten(self) -> Progress | None:
        """The latest progress reported and not yet written, for the statement that ends the run to write."""
        return next((data for name, data in reversed(self.events) if name == "progress"), None)

    async def around(self, job: Awaitable[T]) -> T:
        """Run the job's code; its log lines are written before this returns or raises, so they come before the
        status event that ends the attempt. A last progress report alone is left to that statement."""
        try:
            return await job
        finally:
            self.over = True
            if self.dropped or any(name == "log" for name, _ in self.events):
                await self._pulse.flush(self)

    def stop(self) -> None:
        self._pulse.detach(self)

    def halt(self, why: Literal["superseded", "cancelled"]) -> None:
        self.stopped = why
        self._pulse.detach(self)
        if self.task is not None:
            self.task.cancel()

    def take(self) -> list[Event]:
        """The events to write, and none left pending."""
        events, self.events = self.events, []
        if self.dropped:
            warning = f"{self.dropped} log lines dropped: over {LOG_MAX_PENDING} per write"
            events.append(("log", {"level": "warning", "message": warning}))
            self.dropped = 0
        return events


class Pulse:
    """The one writer of a worker process's running attempts (see the module's text)."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._interval = deps.config.lease_s / 3
        self._beats: dict[tuple[UUID, int], Heartbeat] = {}
        self._changed = asyncio.Event()
        self._written_at = -math.inf  # when the last write with events was sent
        self._retry_at = -math.inf  # after a failed write, not before then
        self._sleeping_until = -math.inf  # while the writer waits: until when
        self._task: asyncio.Task[None] | None = None

    def attach(self, claimed: Claimed, *, leased_at: float) -> Heartbeat:
        """The attempt's heartbeat; set its `task` before the next await."""
        beat = Heartbeat(self, claimed, leased_at=leased_at)
        self._beats[beat.id, beat.attempt] = beat
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outlast-pulse")
        return beat

    def detach(self, beat: Heartbeat) -> None:
        if self._beats.get((beat.id, beat.attempt)) is beat:
            del self._beats[beat.id, beat.attempt]
        if beat.urgent is not None and not beat.urgent.done():
            beat.urgent.set_result(None)

    def due_soon(self) -> None:
        """Events were reported: wake the writer if it sleeps past when they may be written. Only the first report
        of a tick wakes it, so ten thousand attempts reporting cost one wake-up, not ten thousand."""
        if self._written_at + self._deps.config.progress_interval_s < self._sleeping_until:
            self._changed.set()

    async def flush(self, beat: Heartbeat) -> None:
        """Write the beat's events at once (with whatever else is due), and return once they are written or lost."""
        if (beat.id, beat.attempt) not in self._beats:
            return
        beat.urgent = asyncio.get_running_loop().create_future()
        self._changed.set()
        await asyncio.shield(beat.urgent)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _next(self) -> float:
        """When the next write is due."""
        due = math.inf
        events_at = self._written_at + self._deps.config.progress_interval_s
        for beat in self._beats.values():
            if beat.urgent is not None:
                due = -math.inf
                break
            due = min(due, beat.renewed_at + self._interval, events_at if beat.events or beat.dropped else math.inf)
        return max(due, self._retry_at)

    async def _run(self) -> None:
        while True:
            due = self._next()
            wait = due - time.monotonic()
            if wait > 0:
                self._changed.clear()
                self._sleeping_until = due
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if math.isinf(wait) else wait)
                self._sleeping_until = -math.inf
                continue
            try:
                await self._write()
            except Exception:  # the task must outlive any failure: it alone keeps every lease
                log.exception("heartbeat: a write failed; the next tick tries again")
                self._retry_at = time.monotonic() + min(self._interval, 1.0)

    async def _write(self) -> None:
        now = time.monotonic()
        early = now - EARLY_RENEWAL * self._interval
        beats = self._beats.values()
        taken = [(b, b.take()) for b in beats if b.urgent or b.events or b.dropped or b.renewed_at <= early]
        if any(events for _, events in taken):
            self._written_at = now
        try:
            verdicts = await self._send(taken)
        except database.UNAVAILABLE as exc:
            self._lost(taken, exc)
            return
        finally:
            for beat, _ in taken:
                if beat.urgent is not None and not beat.urgent.done():
                    beat.urgent.set_result(None)
                beat.urgent = None
        self._retry_at = -math.inf
        for beat, _ in taken:
            if self._beats.get((beat.id, beat.attempt)) is not beat:
                continue  # stopped meanwhile
            beat.renewed_at = now
            if (verdict := verdicts.get(beat.id)) is None:
                beat.halt("superseded")
            elif verdict == "cancel":
                beat.halt("cancelled")

    async def _send(self, taken: list[tuple[Heartbeat, list[Event]]]) -> dict[UUID, Verdict]:
        lease_s = self._deps.config.lease_s
        try:
            return await beat_many(self._deps.jobs, [(b.id, b.attempt, e) for b, e in taken], lease_s=lease_s)
        except database.UNAVAILABLE:
            raise
        except Exception:
            # Refused: a deadlock with another batch over one of these rows, or a value the database would not take.
            # Each alone then, so that a bad write costs only its own attempt's events, never a lease.
            log.exception("heartbeat: a write of %d attempts was refused; each goes alone", len(taken))
        verdicts: dict[UUID, Verdict] = {}
        for beat, events in taken:
            try:
                verdicts |= await beat_many(self._deps.jobs, [(beat.id, beat.attempt, events)], lease_s=lease_s)
            except database.UNAVAILABLE:
                raise
            except Exception:
                log.exception("heartbeat %s: the write was refused; its events are dropped", beat.id)
                verdicts |= await beat_many(self._deps.jobs, [(beat.id, beat.attempt, [])], lease_s=lease_s)
        return verdicts

    def _lost(self, taken: list[tuple[Heartbeat, list[Event]]], exc: BaseException) -> None:
        """The write did not happen: keep what it carried for the next, and stop each attempt whose lease runs out
        before then, since the sweep may give its job to another worker from then on."""
        log.warning("heartbeat: database unavailable (%s)", exc)
        retry_in = min(self._interval, 1.0)
        self._retry_at = time.monotonic() + retry_in
        lease_s = self._deps.config.lease_s
        for beat, events in taken:
            if time.monotonic() + retry_in >= beat.renewed_at + lease_s:
                log.warning("job %s attempt %d: lease lost (%s); stopping it", beat.id, beat.attempt, exc)
                beat.halt("superseded")
            else:
                beat.events[:0] = events  # written with the next, in the order they came
