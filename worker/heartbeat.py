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
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar
from uuid import UUID

import msgspec

from worker import database, sql, store
from worker.claim import Claimed
from worker.database import storable
from worker.deps import Deps
from worker.job import LOG_LEVELS, LogLevel, Progress

log = logging.getLogger("outlast.worker")
_encode = msgspec.json.Encoder().encode
T = TypeVar("T")
LOG_MAX_CHARS = 2_000  # a longer log message is cut
LOG_MAX_PENDING = 100  # log lines of one attempt waiting for a write; more are dropped and counted
# Renewing a lease early, in a write that goes anyway, costs a row; renewing it in its own write costs a statement.
EARLY_RENEWAL = 0.5  # of the renewal interval: a lease at least this far along is renewed with the others

# One JSON document carries the whole tick, `[[id, attempt, latest progress or null, [[name, data], …]], …]`: one
# msgspec encode for every attempt, where arrays of uuid, int and jsonb cost asyncpg an encode per element. The answer
# names only the attempts not simply renewed, so a tick of thousands usually reads back no row at all.
_BEAT = """
WITH wanted AS (
    SELECT CAST(w->>0 AS uuid) AS id, CAST(w->>1 AS int) AS attempt, NULLIF(w->2, 'null') AS progress, w->3 AS events
      FROM jsonb_array_elements(CAST(:beats AS jsonb)) AS t(w)
), beat AS (
    UPDATE jobs
       SET lease_expires_at = now() + make_interval(secs => :lease),
           progress = COALESCE(w.progress, jobs.progress),
           event_seq = jobs.event_seq + jsonb_array_length(w.events)
      FROM wanted w
     WHERE jobs.id = w.id AND jobs.attempt = w.attempt AND jobs.status = 'running'
    RETURNING jobs.id, jobs.attempt, jobs.event_seq, w.events, jobs.cancel_requested_at
), event AS (
    INSERT INTO job_events (job_id, seq, name, data)
    SELECT b.id, b.event_seq - jsonb_array_length(b.events) + e.k, e.v->>0, e.v->1
      FROM beat b, jsonb_array_elements(b.events) WITH ORDINALITY AS e(v, k)
)
SELECT w.id, w.attempt, b.id IS NULL AS gone FROM wanted w LEFT JOIN beat b ON b.id = w.id AND b.attempt = w.attempt
 WHERE b.id IS NULL OR b.cancel_requested_at IS NOT NULL
"""

Event = tuple[Literal["progress", "log"], Any]  # (name, its data: a Progress, or a log line's dict)
Verdict = Literal["superseded", "cancel"]


def _json(rows: list[tuple[UUID, int, Progress | None, Sequence[Event]]]) -> str:
    """The tick's document, a NUL or a lone surrogate mended (`storable`)."""
    try:
        encoded = _encode(rows)
    except UnicodeEncodeError:  # a lone surrogate: storable mends the strings in lists and dicts, not in tuples
        return storable([[*row[:3], [list(event) for event in row[3]]] for row in rows])
    return storable(rows) if database.has_nul(encoded) else encoded.decode()


def _by_id(attempt: tuple[UUID, int, Sequence[Event]]) -> int:
    return attempt[0].int


async def beat_many(
    jobs: store.Jobs, attempts: Sequence[tuple[UUID, int, Sequence[Event]]], *, lease_s: float
) -> dict[tuple[UUID, int], Verdict]:
    """Extend the leases of these running attempts and append their events, in one statement. The answer names each
    attempt that was not simply renewed: `superseded`, no longer its job's running attempt (nothing was written for
    it), or `cancel`, renewed but asked to stop; every attempt it does not name was renewed."""
    rows = []
    for job_id, attempt, events in sorted(attempts, key=_by_id):  # rows locked in one order
        latest = None
        for name, data in events:
            if name == "progress":
                latest = data
        rows.append((job_id, attempt, latest, events))
    answer = await sql.fetch_all(jobs.db, _BEAT, {"beats": _json(rows), "lease": lease_s})
    jobs.changed(job_id for job_id, _, events in attempts if events)
    return {(row["id"], row["attempt"]): "superseded" if row["gone"] else "cancel" for row in answer}


class Heartbeat:
    """One running attempt, as the pulse writes it."""

    __slots__ = ("_pulse", "attached", "attempt", "dropped", "events", "id", "logs", "message", "over", "renewed_at",
                 "stopped", "task", "urgent")  # fmt: skip

    def __init__(self, pulse: Pulse, claimed: Claimed, *, leased_at: float) -> None:
        self.id, self.attempt = claimed.id, claimed.attempt
        self._pulse = pulse
        self.attached = True  # until stop() or halt(): the pulse writes for it
        self.renewed_at = leased_at  # when the write that last extended the lease was sent (or the claim)
        self.events: list[Event] = []  # reported, not yet written, in order
        self.logs = 0  # how many of them are log lines
        self.dropped = 0
        self.urgent: asyncio.Future[None] | None = None  # set by around(): its last lines are to be written now
        self.task: asyncio.Future[Any] | None = None  # the job's code, stopped when its attempt is
        self.over = False  # the job's code returned: a line a task it left behind writes now is not written
        self.message: str | None = None  # the last message reported, kept for the final progress
        self.stopped: Literal["superseded", "cancelled"] | None = None

    def report(self, progress: Progress) -> None:
        self.message = progress.message
        events = self.events
        if events and events[-1][0] == "progress":
            events[-1] = ("progress", progress)  # only the latest of a run of reports is written
        else:
            events.append(("progress", progress))
        self._pulse.news(self)

    def log(self, level: LogLevel, message: str) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(sorted(LOG_LEVELS))}, not {level!r}")
        if self.over:
            return
        if self.logs >= LOG_MAX_PENDING:
            self.dropped += 1
            return
        if len(message) > LOG_MAX_CHARS:
            message = message[: LOG_MAX_CHARS - 1] + "…"
        self.events.append(("log", {"level": level, "message": message}))
        self.logs += 1
        self._pulse.news(self)

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
            if self.dropped or self.logs:
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
        events, self.events, self.logs = self.events, [], 0
        if self.dropped:
            warning = f"{self.dropped} log lines dropped: over {LOG_MAX_PENDING} per write"
            events.append(("log", {"level": "warning", "message": warning}))
            self.dropped = 0
        return events

    def put_back(self, events: list[Event]) -> None:
        """A write that carried `events` did not happen: they go with the next, before any reported since."""
        self.events[:0] = events
        self.logs = sum(name == "log" for name, _ in self.events)


class Pulse:
    """The one writer of a worker process's running attempts (see the module's text).

    What a tick costs grows with what changed, not with how many attempts run: the attempts that reported since the
    last write wait in `_news`, and the leases in a heap by when each was renewed (one entry per attempt, at or
    before its renewal: an entry found older than its attempt's renewal moves on instead of renewing it), so a
    write finds what is due without a look at the attempts that are not.
    """

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._interval = deps.config.lease_s / 3
        self._beats: dict[tuple[UUID, int], Heartbeat] = {}
        self._news: set[Heartbeat] = set()  # attached attempts with events (or a flush) not yet written
        self._leases: list[tuple[float, int, Heartbeat]] = []  # a heap: (renewed at or after, tie-break, attempt)
        self._order = itertools.count()
        self._gone = 0  # entries of the heap whose attempt was detached
        self._flush = False  # an attempt waits for its lines to be written: write now
        self._changed = asyncio.Event()
        self._written_at = -math.inf  # when the last write with events was sent
        self._retry_at = -math.inf  # after a failed write, not before then
        self._sleeping_until = -math.inf  # while the writer waits: until when
        self._task: asyncio.Task[None] | None = None

    def attach(self, claimed: Claimed, *, leased_at: float) -> Heartbeat:
        """The attempt's heartbeat; set its `task` before the next await."""
        beat = Heartbeat(self, claimed, leased_at=leased_at)
        self._beats[beat.id, beat.attempt] = beat
        heapq.heappush(self._leases, (leased_at, next(self._order), beat))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outlast-pulse")
        return beat

    def detach(self, beat: Heartbeat) -> None:
        if beat.attached:
            beat.attached = False
            if self._beats.get((beat.id, beat.attempt)) is beat:
                del self._beats[beat.id, beat.attempt]
            self._news.discard(beat)
            self._gone += 1
            if self._gone > 2 * len(self._beats) + 64:  # the heap holds more ended attempts than running ones
                self._leases = [entry for entry in self._leases if entry[2].attached]
                heapq.heapify(self._leases)
                self._gone = 0
        if beat.urgent is not None and not beat.urgent.done():
            beat.urgent.set_result(None)

    def news(self, beat: Heartbeat) -> None:
        """The attempt reported events: they go with the next write, which wakes if it sleeps past when they may
        be written. Only the first report of a tick wakes it, so ten thousand attempts reporting cost one wake-up,
        not ten thousand."""
        if beat.attached:
            self._news.add(beat)
            if self._written_at + self._deps.config.progress_interval_s < self._sleeping_until:
                self._changed.set()

    async def flush(self, beat: Heartbeat) -> None:
        """Write the beat's events at once (with whatever else is due), and return once they are written or lost."""
        if not beat.attached:
            return
        beat.urgent = asyncio.get_running_loop().create_future()
        self._news.add(beat)
        self._flush = True
        self._changed.set()
        await asyncio.shield(beat.urgent)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _oldest(self) -> float:
        """When the least recently renewed running attempt was renewed (inf: none runs). Entries met on the way
        that are older than their attempt's renewal move to where it puts them; those of ended attempts go."""
        leases = self._leases
        while leases:
            at, _, beat = leases[0]
            if not beat.attached:
                heapq.heappop(leases)
                self._gone -= 1
            elif beat.renewed_at > at:
                heapq.heapreplace(leases, (beat.renewed_at, next(self._order), beat))
            else:
                return at
        return math.inf

    def _next(self) -> float:
        """When the next write is due."""
        if self._flush:
            due = -math.inf
        else:
            due = self._oldest() + self._interval
            if self._news:
                due = min(due, self._written_at + self._deps.config.progress_interval_s)
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

    def _due(self, early: float) -> list[Heartbeat]:
        """The running attempts whose lease was last renewed at or before `early`, their entries taken off the
        heap (the caller puts them back)."""
        due = []
        while self._oldest() <= early:
            due.append(heapq.heappop(self._leases)[2])
        return due

    async def _write(self) -> None:
        now = time.monotonic()
        due = self._due(now - EARLY_RENEWAL * self._interval)
        news, self._news, self._flush = self._news, set(), False
        news.update(due)
        taken = [(beat, beat.take()) for beat in news]
        if not taken:
            return  # what woke the writer was renewed meanwhile
        if any(events for _, events in taken):
            self._written_at = now
        try:
            verdicts = await self._send(taken)
        except database.UNAVAILABLE as exc:
            self._lost(taken, exc)
            return
        else:
            self._retry_at = -math.inf
            self._heard(taken, verdicts, now)
        finally:
            for beat, _ in taken:
                if beat.urgent is not None and not beat.urgent.done():
                    beat.urgent.set_result(None)
                beat.urgent = None
            for beat in due:  # back on the heap, at their new renewal or, the write lost, their old one
                if beat.attached:
                    heapq.heappush(self._leases, (beat.renewed_at, next(self._order), beat))

    def _heard(
        self, taken: list[tuple[Heartbeat, list[Event]]], verdicts: dict[tuple[UUID, int], Verdict], sent_at: float
    ) -> None:
        """The write's answer: every attempt it carried was renewed as of `sent_at`, but those it names, stopped."""
        for beat, _ in taken:
            if not beat.attached:
                continue  # stopped meanwhile
            beat.renewed_at = sent_at
            if (verdict := verdicts.get((beat.id, beat.attempt))) == "superseded":
                beat.halt("superseded")
            elif verdict == "cancel":
                beat.halt("cancelled")

    async def _send(self, taken: list[tuple[Heartbeat, list[Event]]]) -> dict[tuple[UUID, int], Verdict]:
        lease_s = self._deps.config.lease_s
        try:
            return await beat_many(self._deps.jobs, [(b.id, b.attempt, e) for b, e in taken], lease_s=lease_s)
        except database.UNAVAILABLE:
            raise
        except Exception:
            # Refused: a deadlock with another batch over one of these rows, or a value the database would not take.
            # Each alone then, so that a bad write costs only its own attempt's events, never a lease.
            log.exception("heartbeat: a write of %d attempts was refused; each goes alone", len(taken))
        verdicts: dict[tuple[UUID, int], Verdict] = {}
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
                if events:
                    beat.put_back(events)  # written with the next, in the order they came
                    self._news.add(beat)
