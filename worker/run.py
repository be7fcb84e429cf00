"""run_job(ctx, message): one attempt of one job, from the guarded claim to its finish or retry.

Every outcome becomes a row: arq never retries on its own, Postgres counts attempts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar
from uuid import UUID

import msgspec

from worker import blobs, claim, database, egress, logs, metrics, spawn, store, tracing, workflows
from worker.batch import Batcher
from worker.capacity import Capacity, wake, wake_keys
from worker.claim import Claimed
from worker.deps import Deps
from worker.executors import Executors
from worker.heartbeat import Heartbeat, Pulse
from worker.job import CANCELLED, Context, Error, JobError, JobType, Progress, Status, Waiting
from worker.job_types.report import job_stats
from worker.queue import Bell, enqueue, enqueue_many, parse_message
from worker.retry import backoff
from worker.sweep import cancel_requeued
from worker.vectors import store as vector_store

log = logging.getLogger("outlast.worker")
T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
OWNER = f"{socket.gethostname()}:{os.getpid()}"
# How long claims and finishes that wait behind one on its way linger for others to join them. Only a busy worker
# waits at all; 10 ms more per claim and finish then is nothing beside a job, and a tenth as many round trips
# and commits drain the queue 1.4x as fast on two cores (docs/performance.md).
WRITE_LINGER_S = 0.01
# A job over its type's rate due later than this is rung by the sweep, not by a task held in this worker meanwhile.
RING_LATER_MAX_S = 60.0
NOTHING: Mapping[str, Any] = MappingProxyType({})  # ctx.upstream and ctx.children of most attempts: one for all
ERROR_MAX_CHARS = 2_000  # a job's error message is cut to this: it is stored with the job and in its events


@dataclass(frozen=True)
class Runtime:
    """What run_job needs besides connections, once per worker process: the registry of job types, the claims and
    finishes of the attempts it runs, batched (worker/batch.py), and the tenants' caps (worker/capacity.py)."""

    job_types: Mapping[str, JobType]
    claims: Batcher[tuple[UUID, int], Claimed | Bell | None]
    finishes: Batcher[store.Finish, bool]
    wakes: Batcher[Claimed, None]  # attempts that gave slots back: what waits for those slots is dispatched
    capacity: Capacity
    slots: metrics.Slots
    executors: Executors  # where plain-function job types run
    pulse: Pulse  # the one writer of every running attempt's lease, progress and log (worker/heartbeat.py)
    blobs: blobs.Blobs  # the blob store every attempt's ctx.output and ctx.open go to
    later: set[asyncio.Task[None]] = field(default_factory=set)  # rings waiting for their time (ring_later)
    # ctx.vectors of each tenant that ran a job here: one for all its attempts, as it holds nothing of theirs
    vectors: dict[str, vector_store.Vectors] = field(default_factory=dict)

    @classmethod
    def of(cls, deps: Deps, job_types: Mapping[str, JobType], *, name: str = OWNER) -> Runtime:
        jobs, config = deps.jobs, deps.config
        limits = {t.name: t.concurrency for t in job_types.values() if t.concurrency is not None}
        rates = {t.name: t.rate for t in job_types.values() if t.rate is not None}
        capacity = Capacity(name, config.worker_max_jobs, config.tenant_max_share, limits=limits, rates=rates)

        async def claims(wanted: Sequence[tuple[UUID, int]]) -> list[Claimed | Bell | None]:
            return await claim.claim_many(jobs, wanted, owner=OWNER, lease_s=config.lease_s, capacity=capacity)

        async def finish(finishes: Sequence[store.Finish]) -> list[bool]:
            return await store.finish_many(jobs, finishes)

        async def wakes(stopped: Sequence[Claimed]) -> list[None]:
            await _wake(deps, capacity, stopped)
            return [None] * len(stopped)

        return cls(
            job_types,
            Batcher(claims, shared=database.UNAVAILABLE, linger_s=WRITE_LINGER_S),
            Batcher(finish, shared=database.UNAVAILABLE, linger_s=WRITE_LINGER_S),
            Batcher(wakes, shared=database.UNAVAILABLE, linger_s=WRITE_LINGER_S),
            capacity,
            metrics.Slots(config.worker_max_jobs),
            Executors(config.worker_max_jobs),
            Pulse(deps),
            blobs.of(config, deps.db),
        )

    def ring_later(self, deps: Deps, bell: Bell) -> None:
        """Ring `bell` once its delay is over. Not now: arq still holds this message's id until run_job returns,
        and would drop a ring for it. A long wait, or one this worker does not live to see, is the sweep's: the row
        says when the job is due, and that it was rung before."""
        if bell.delay_s > RING_LATER_MAX_S:
            return

        async def ring() -> None:
            await asyncio.sleep(bell.delay_s)
            if not await enqueue_many(deps.redis, [bell._replace(delay_s=0.0)], step_s=deps.config.priority_step_s):
                log.warning("ring %s: Redis unavailable; the sweep will dispatch it", bell.job_id)

        task = asyncio.create_task(ring())
        self.later.add(task)
        task.add_done_callback(self.later.discard)

    def vectors_of(self, deps: Deps, tenant: str) -> vector_store.Vectors:
        if (vectors := self.vectors.get(tenant)) is None:
            vectors = self.vectors[tenant] = vector_store.for_job(deps.db, tenant)
        return vectors

    async def aclose(self) -> None:
        for task in list(self.later):
            task.cancel()
        await self.claims.aclose()
        await self.finishes.aclose()
        await self.wakes.aclose()
        self.executors.shutdown()
        await self.pulse.aclose()


TURNED_AWAY = "outlast_turned_away"  # in a message's arq ctx: its claim started nothing


async def after_job_end(ctx: dict[str, Any]) -> None:
    """arq's hook once it has let go of a message's id: ring again a job that was woken while arq still held it."""
    if (turned_away := ctx.get(TURNED_AWAY)) is None:
        return
    deps: Deps = ctx["deps"]
    try:
        bell = await claim.woken_meanwhile(deps.db, *turned_away)
        if bell is not None and not await enqueue_many(deps.redis, [bell], step_s=deps.config.priority_step_s):
            log.warning("ring %s: Redis unavailable; the sweep will dispatch it", bell.job_id)
    except database.UNAVAILABLE as exc:
        log.warning("after %s: database unavailable (%s); the sweep dispatches it", turned_away[0], exc)


@tracing.attempts  # the attempt's span, once its claim has won (tracing.attempt_started)
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
        # A stale or duplicate delivery (someone else has it, or it ended), or it waits for a slot: then a slot given
        # back before arq lets go of this message's id rings in vain, and after_job_end rings again.
        ctx[TURNED_AWAY] = (job_id, started)
        return
    if isinstance(claimed, Bell):  # over its type's rate: rung again for when the bucket holds its token
        runtime.ring_later(deps, claimed)
        return
    logs.job.set((str(claimed.id), claimed.attempt, claimed.tenant_id))  # this task's log lines, and its children's
    tracing.attempt_started(claimed)
    metrics.attempts.labels(claimed.type).inc()
    metrics.queue_wait_seconds.labels(claimed.type).observe(claimed.waited_s)
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
    claimed = msgspec.structs.replace(claimed, input="")  # parsed: its text need not live as long as the attempt
    await _run(deps, runtime, job_type, claimed, value, leased_at=claim_sent_at)


async def _run(
    deps: Deps, runtime: Runtime, job_type: JobType, claimed: Claimed, value: Any, *, leased_at: float
) -> None:
    beat = runtime.pulse.attach(claimed, leased_at=leased_at)  # its lease, progress and log, written each tick

    async def spawn_child(type: str, input: Any, key: str, metadata: Mapping[str, Any] | None) -> UUID:
        return await spawn.spawn(
            deps, runtime.job_types, (claimed.id, claimed.attempt), type, input, key=key, metadata=metadata
        )

    upstream = NOTHING if claimed.upstream is None else msgspec.json.decode(claimed.upstream)
    files = blobs.ForJob(runtime.blobs, claimed.tenant_id, claimed.id, claimed.attempt)
    children = await spawn.children(deps.db, claimed.id) if claimed.waits else NOTHING
    http = egress.for_job(deps.config, beat.log)  # the job's own requests: guarded (worker/egress.py)
    context = Context(
        claimed.id, claimed.attempt, claimed.max_attempts, beat.report, beat.log, upstream, children, spawn_child, http,
        _output=files.output, _open=files.open, _job_stats=partial(job_stats, deps.db, claimed.tenant_id),
        vectors=runtime.vectors_of(deps, claimed.tenant_id),
    )  # fmt: skip
    task = beat.task = asyncio.ensure_future(beat.around(runtime.executors.call(job_type, value, context)))
    runtime.slots.take()
    began = time.monotonic()
    # The timeout cancels the job's task, as asyncio.wait_for would, without wait_for's frame, future and callback
    # per running attempt.
    loop, this = asyncio.get_running_loop(), asyncio.current_task()
    assert this is not None  # arq's task for this message
    deadline = loop.call_later(claimed.timeout_s, task.cancel)
    try:
        result = await task
        if this.cancelling():
            raise asyncio.CancelledError  # arq cancelled us, and the job's code returned all the same
    except asyncio.CancelledError:
        if beat.stopped == "superseded":
            return  # a newer attempt owns the row: this one writes nothing
        if beat.stopped == "cancelled":
            # arq's abort of the same cancel may land during this write: it must not cut the write short, or the
            # row stays `running` until its lease runs out.
            await _to_the_end(_end(deps, runtime, claimed, "cancelled", error=CANCELLED))
            return
        if not this.cancelling() and loop.time() >= deadline.when():
            error = Error("timeout", f"the job ran past its timeout_s of {claimed.timeout_s}", True)
            await _failed(deps, runtime, claimed, error)
            return
        # arq cancelled us: a cancel request (arq abort) or the worker's shutdown after its grace period.
        await _to_the_end(_stopped_from_outside(deps, runtime, claimed))
        raise
    except JobError as exc:
        await _failed(deps, runtime, claimed, Error(exc.type, _clipped(exc, ERROR_MAX_CHARS), exc.retryable))
    except Exception as exc:
        log.exception("job %s attempt %d raised", claimed.id, claimed.attempt)
        await _failed(deps, runtime, claimed, Error(type(exc).__name__, _clipped(exc, ERROR_MAX_CHARS), True))
    else:
        await _returned(deps, runtime, claimed, result, beat)
    finally:
        deadline.cancel()
        beat.stop()
        runtime.slots.give_back()
        metrics.run_seconds.labels(claimed.type).observe(time.monotonic() - began)


async def _to_the_end(write: Coroutine[Any, Any, object]) -> None:
    """Await an attempt's last write to its end, however often the task awaiting it is cancelled meanwhile, then
    let a cancel through. asyncio.shield alone returns at the first cancel, and a burst worker or a shutdown that
    follows may then close the loop under the write."""
    task = asyncio.ensure_future(write)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def _returned(deps: Deps, runtime: Runtime, claimed: Claimed, result: Any, beat: Heartbeat) -> None:
    """The job's code returned: its result, or `ctx.wait_for_children()`."""
    if isinstance(result, Waiting):
        await _wait(deps, runtime, claimed, beat.unwritten)
    else:
        await _succeeded(deps, runtime, claimed, result, Progress(1.0, beat.message))


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
    if database.has_nul(encoded):  # the row would refuse it
        error = Error("invalid_result", f"the result holds a NUL: {database.NUL_MSG}", False)
        await _end(deps, runtime, claimed, "failed", error=error)
        return
    try:
        if len(encoded) > deps.config.inline_result_bytes and claimed.workflow_id is None and claimed.parent_id is None:
            # claim-check: the blob store keeps the bytes, the row their size (a workflow step's or a spawned child's
            # result stays in the row, where the next steps and the parent read it)
            blob = await blobs.of(deps.config, deps.db).write(
                encoded, tenant=claimed.tenant_id, kind="result", content_type="application/json",
                job_id=claimed.id, attempt=claimed.attempt,
            )  # fmt: skip
            await _end(deps, runtime, claimed, "succeeded", result_size=blob.size, progress=progress)
        else:
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
                metrics.finished.labels(claimed.type, "cancelled").inc()
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
    """The attempt stopped running and gave back its tenant's slot or its key's, or moved its workflow on: dispatch
    the jobs that wait for those slots, and start the steps it made ready, now rather than at the sweep's next pass
    (in one statement with the other attempts that stopped meanwhile: a statement per finished job costs a busy
    drain a fifth of its rate)."""
    if not claimed.slots and claimed.workflow_id is None and claimed.parent_id is None:
        return
    try:
        await runtime.wakes(claimed)
    except database.UNAVAILABLE as exc:
        log.warning("wake after %s: database unavailable (%s); the sweep dispatches what waits", claimed.id, exc)


async def _wake(deps: Deps, capacity: Capacity, stopped: Sequence[Claimed]) -> None:
    db, batch = deps.db, deps.config.sweep_batch
    slots = [(c, c.slots or []) for c in stopped]
    keys = sorted({(c.type, c.concurrency_key) for c, held in slots if "key" in held and c.concurrency_key})
    tenants = sorted({c.tenant_id for c, held in slots if "tenant" in held})
    flows = sorted({c.workflow_id for c in stopped if c.workflow_id is not None})
    parents = sorted({c.parent_id for c in stopped if c.parent_id is not None})
    woken = []
    if keys:
        woken += await wake_keys(db, keys, capacity, batch=batch)
    if tenants:
        woken += await wake(db, tenants, capacity, batch=batch)
    if flows:
        woken += await workflows.start_ready(db, flows, ttl_s=deps.config.job_ttl_s, batch=batch)
        # a workflow that failed marked its queued jobs: they end now, not at the sweep's next pass
        await cancel_requeued(deps.jobs, batch=batch, workflows=flows)
        for flow in flows:  # their steps moved: the workflows' streams read their logs
            deps.notifier.notify(flow)
    if parents:
        woken += await spawn.resume(db, parents, batch=batch)
    if woken and not await enqueue_many(deps.redis, woken, step_s=deps.config.priority_step_s):
        await store.undispatch_many(db, [(bell.job_id, bell.started) for bell in woken])


async def _wait(deps: Deps, runtime: Runtime, claimed: Claimed, progress: Progress | None) -> None:
    """The run ended waiting for the job's children: queued, holding nothing, until they ended (worker/spawn.py);
    resumed at once when they have already."""
    waited = await database.persist(
        lambda: spawn.wait(deps.jobs, claimed.id, claimed.attempt, progress=progress, ttl_s=deps.config.job_ttl_s),
        what=f"wait {claimed.id}",
    )
    if not waited:
        if claimed.waits >= spawn.MAX_WAITS:
            why = f"the job waited for its children {spawn.MAX_WAITS} times; it may wait at most that often"
            await _end(deps, runtime, claimed, "failed", error=Error("too_many_waits", why, False))
        return  # else superseded: a newer attempt owns the row
    await _gave_back(deps, runtime, claimed)
    resumed = await spawn.resume(deps.db, [claimed.id], batch=1)
    if resumed and not await enqueue_many(deps.redis, resumed, step_s=deps.config.priority_step_s):
        await store.undispatch_many(deps.db, [(bell.job_id, bell.started) for bell in resumed])


async def _failed(deps: Deps, runtime: Runtime, claimed: Claimed, error: Error) -> None:
    """A failed attempt: retry later while attempts remain and the error allows it, else end `failed`."""
    config = deps.config
    if not (error.retryable and claimed.attempts_left):
        await _end(deps, runtime, claimed, "failed", error=error)
        return
    delay = backoff(claimed.attempt - claimed.interrupted, base=config.backoff_base_s, cap=config.backoff_cap_s)
    log.info("attempt %d failed (%s: %s); retrying in %.1fs", claimed.attempt, error.type, error.message[:200], delay)
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
    result_size: int | None = None,
) -> bool:
    """Move the attempt to `to` (`queued`: a retry in `retry_in_s`) through the batched finishes. False: someone
    won first."""
    finish = store.Finish(claimed.id, claimed.attempt, to, result, error, progress, retry_in_s, result_size)
    moved = await database.persist(lambda: runtime.finishes(finish), what=f"finish {claimed.id}")
    tracing.attempt_ended(to, error)
    if moved:
        if to == "queued":
            metrics.retries.labels(claimed.type).inc()
        else:
            metrics.finished.labels(claimed.type, to).inc()
        await _gave_back(deps, runtime, claimed)
    return moved
