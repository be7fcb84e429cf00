"""run_job(ctx, message): one attempt of one job, from the guarded claim to its finish or retry.

Every outcome becomes a row: arq never retries on its own, Postgres counts attempts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

import msgspec

from worker import claim, database, events, store
from worker.batch import Batcher
from worker.capacity import Capacity, wake, wake_key
from worker.claim import Claimed
from worker.deps import Deps
from worker.heartbeat import Heartbeat
from worker.job import CANCELLED, Context, Error, JobError, JobType, Progress, Status
from worker.queue import enqueue, enqueue_many, parse_message
from worker.retry import backoff

log = logging.getLogger("outlast.worker")
T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
OWNER = f"{socket.gethostname()}:{os.getpid()}"
# How long claims and finishes that wait behind one on its way linger for others to join them. Only a busy worker
# waits at all; 10 ms more per claim and finish then is nothing beside a job, and a tenth as many round trips
# and commits drain the queue 1.4x as fast on two cores (docs/performance.md).
WRITE_LINGER_S = 0.01
ERROR_MAX_CHARS = 2_000  # a job's error message is cut to this: it is stored with the job and in its events


@dataclass(frozen=True)
class Runtime:
    """What run_job needs besides connections, once per worker process: the registry of job types, the claims and
    finishes of the attempts it runs, batched (worker/batch.py), and the tenants' caps (worker/capacity.py)."""

    job_types: Mapping[str, JobType]
    claims: Batcher[tuple[UUID, int], Claimed | None]
    finishes: Batcher[store.Finish, bool]
    capacity: Capacity

    @classmethod
    def of(cls, deps: Deps, job_types: Mapping[str, JobType], *, name: str = OWNER) -> Runtime:
        jobs, config = deps.jobs, deps.config
        limits = {t.name: t.concurrency for t in job_types.values() if t.concurrency is not None}
        capacity = Capacity(name, config.worker_max_jobs, config.tenant_max_share, limits=limits)

        async def claims(wanted: Sequence[tuple[UUID, int]]) -> list[Claimed | None]:
            return await claim.claim_many(jobs, wanted, owner=OWNER, lease_s=config.lease_s, capacity=capacity)

        async def finish(finishes: Sequence[store.Finish]) -> list[bool]:
            return await store.finish_many(jobs, finishes)

        return cls(
            job_types,
            Batcher(claims, shared=database.UNAVAILABLE, linger_s=WRITE_LINGER_S),
            Batcher(finish, shared=database.UNAVAILABLE, linger_s=WRITE_LINGER_S),
            capacity,
        )

    async def aclose(self) -> None:
        await self.claims.aclose()
        await self.finishes.aclose()


async def run_job(ctx: dict[str, Any], text: str) -> None:
    deps: Deps = ctx["deps"]
    runtime: Runtime = ctx["runtime"]
    job_id, started = parse_message(text)
    try:
        claim_sent_at = time.monotonic()  # no later than the database's clock starts the lease
        claimed = await runtime.claims((job_id, started))
    except database.UNAVAILABLE as exc:
        # Lost with the answer on its way, the claim (and the batch it went in) may have committed: hand such a job
        # back. Otherwise the row is still queued and marked dispatched: the sweep rings again.
        log.warning("claim %s: database unavailable (%s)", text, exc)
        await _claim_interrupted(deps, runtime, job_id, started + 1)
        return
    except asyncio.CancelledError:
        # An abort or the shutdown landed while the claim was in flight: it may have committed all the same.
        await asyncio.shield(_claim_interrupted(deps, runtime, job_id, started + 1))
        raise
    if claimed is None:
        return  # a stale or duplicate delivery: someone else has it, or it ended
    job_type = runtime.job_types.get(claimed.type)
    if job_type is None:
        error = Error("unknown_job_type", f"no worker here knows job type {claimed.type!r}", False)
        await _end(deps, runtime, claimed, "failed", error=error)
        return
    try:
        value = job_type.decoder.decode(claimed.input)
    except msgspec.ValidationError as exc:
        await _end(deps, runtime, claimed, "failed", error=Error("invalid_input", str(exc), False))
        return
    await _run(deps, runtime, job_type, claimed, value, leased_at=claim_sent_at)


async def _run(
    deps: Deps, runtime: Runtime, job_type: JobType, claimed: Claimed, value: Any, *, leased_at: float
) -> None:
    journal = events.Journal(
        deps.db, deps.notifier, claimed.id, claimed.attempt, interval_s=deps.config.progress_interval_s
    )
    beat: Heartbeat | None = None

    def report(progress: Progress) -> None:
        assert beat is not None
        beat.report(progress)

    context = Context(claimed.id, claimed.attempt, claimed.max_attempts, report, journal.write)
    task = asyncio.ensure_future(journal.around(job_type.run(value, context)))
    beat = Heartbeat(deps, claimed, task, leased_at=leased_at)
    beat.start()
    try:
        result = await asyncio.wait_for(task, claimed.timeout_s)
    except TimeoutError:
        await _failed(
            deps, runtime, claimed, Error("timeout", f"the job ran past its timeout_s of {claimed.timeout_s}", True)
        )
    except asyncio.CancelledError:
        if beat.stopped == "superseded":
            return  # a newer attempt owns the row: this one writes nothing
        if beat.stopped == "cancelled":
            await _end(deps, runtime, claimed, "cancelled", error=CANCELLED)
            return
        # arq cancelled us: a cancel request (arq abort) or the worker's shutdown after its grace period.
        await asyncio.shield(_stopped_from_outside(deps, runtime, claimed))
        raise
    except JobError as exc:
        await _failed(deps, runtime, claimed, Error(exc.type, _clipped(exc, ERROR_MAX_CHARS), exc.retryable))
    except Exception as exc:
        log.exception("job %s attempt %d raised", claimed.id, claimed.attempt)
        await _failed(deps, runtime, claimed, Error(type(exc).__name__, _clipped(exc, ERROR_MAX_CHARS), True))
    else:
        await _succeeded(deps, runtime, claimed, result, Progress(1.0, beat.message))
    finally:
        beat.stop()


async def _succeeded(deps: Deps, runtime: Runtime, claimed: Claimed, result: Any, progress: Progress) -> None:
    """Store the result, or end the attempt `failed` with `invalid_result` at once when it can't be encoded or
    stored: no later attempt would do better, and an exception escaping here would leave the row `running` until
    its lease ran out, to be retried into the same wall and end `worker_lost`."""
    try:
        encoded = _encode(result)
    except Exception as exc:  # not JSON, a lone surrogate, an int past Python's digit limit for str()...
        error = Error("invalid_result", f"the result can't be encoded as JSON: {_clipped(exc)}", False)
        await _end(deps, runtime, claimed, "failed", error=error)
        return
    if database.NUL.search(encoded):  # the row would refuse it
        error = Error("invalid_result", f"the result holds a NUL: {database.NUL_MSG}", False)
        await _end(deps, runtime, claimed, "failed", error=error)
        return
    try:
        await _end(deps, runtime, claimed, "succeeded", result=encoded, progress=progress)
    except database.UNAVAILABLE:
        raise  # retried for minutes already: the lease runs out and the sweep decides
    except Exception as exc:
        log.exception("job %s attempt %d: its result could not be stored", claimed.id, claimed.attempt)
        error = Error("invalid_result", f"the result could not be stored: {_clipped(exc)}", False)
        await _end(deps, runtime, claimed, "failed", error=error)


def _clipped(exc: BaseException, limit: int = 500) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _claim_interrupted(deps: Deps, runtime: Runtime, job_id: UUID, attempt: int) -> None:
    """Hand attempt `attempt` back now if a claim whose answer never came did start it, rather than leave it running,
    with no task, until its lease runs out. None of its code ran, so it goes back whatever its type."""
    try:
        claimed = await database.persist(
            lambda: claim.owned(deps.db, job_id, attempt, owner=OWNER), what=f"claim {job_id}", give_up_after_s=10
        )
    except database.UNAVAILABLE:
        return  # the lease ends it: the sweep rescues the job
    if claimed is not None:
        await _stopped_from_outside(deps, runtime, claimed, ran=False)


async def _stopped_from_outside(deps: Deps, runtime: Runtime, claimed: Claimed, *, ran: bool = True) -> None:
    async def stop() -> None:
        if await store.cancel_requested(deps.db, claimed.id, claimed.attempt):
            if await store.finish(deps.jobs, claimed.id, claimed.attempt, "cancelled", error=CANCELLED):
                await _gave_back(deps, runtime, claimed)
            return
        outcome = await store.interrupt(deps.jobs, claimed.id, claimed.attempt, ran=ran)
        what = "interrupted" if ran else "handed back before it ran"
        log.warning("job %s attempt %d %s: now %s", claimed.id, claimed.attempt, what, outcome)
        if outcome is not None:
            await _gave_back(deps, runtime, claimed)
        if outcome == "queued":
            await enqueue(deps.redis, claimed.id, claimed.attempt, priority=claimed.priority)

    await database.persist(stop, what=f"stop {claimed.id}", give_up_after_s=10)


async def _gave_back(deps: Deps, runtime: Runtime, claimed: Claimed) -> None:
    """The attempt stopped running and gave back its tenant's slot or its key's: dispatch the jobs that wait for
    them now, rather than at the sweep's next pass."""
    if not claimed.slots:
        return
    db, capacity, batch = deps.db, runtime.capacity, deps.config.sweep_batch
    try:
        woken = []
        if "key" in claimed.slots and claimed.concurrency_key is not None:
            woken += await wake_key(db, claimed.type, claimed.concurrency_key, capacity, batch=batch)
        if "tenant" in claimed.slots:
            woken += await wake(db, [claimed.tenant_id], capacity, batch=batch)
    except database.UNAVAILABLE as exc:
        log.warning("wake after %s: database unavailable (%s); the sweep dispatches what waits", claimed.id, exc)
        return
    if woken and not await enqueue_many(deps.redis, woken, step_s=deps.config.priority_step_s):
        await store.undispatch_many(deps.db, [(bell.job_id, bell.started) for bell in woken])


async def _failed(deps: Deps, runtime: Runtime, claimed: Claimed, error: Error) -> None:
    """A failed attempt: retry later while attempts remain and the error allows it, else end `failed`."""
    config = deps.config
    if not (error.retryable and claimed.attempts_left):
        await _end(deps, runtime, claimed, "failed", error=error)
        return
    delay = backoff(claimed.attempt - claimed.interrupted, base=config.backoff_base_s, cap=config.backoff_cap_s)
    moved = await _end(deps, runtime, claimed, "queued", error=error, retry_in_s=delay)
    if moved and not await enqueue(deps.redis, claimed.id, claimed.attempt, delay_s=delay):
        log.warning("retry %s: Redis unavailable; the sweep will dispatch it", claimed.id)


async def _end(
    deps: Deps,
    runtime: Runtime,
    claimed: Claimed,
    to: Status,
    *,
    result: bytes | None = None,
    error: Error | None = None,
    progress: Progress | None = None,
    retry_in_s: float = 0.0,
) -> bool:
    """Move the attempt to `to` (`queued`: a retry in `retry_in_s`) through the batched finishes. False: someone
    won first."""
    finish = store.Finish(claimed.id, claimed.attempt, to, result, error, progress, retry_in_s)
    moved = await database.persist(lambda: runtime.finishes(finish), what=f"finish {claimed.id}")
    if moved:
        await _gave_back(deps, runtime, claimed)
    return moved
