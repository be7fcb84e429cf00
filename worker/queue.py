"""The doorbell: enqueue(job_id, started), and arq's other keys the engine touches (abort, the sweep's clean-ups).

A message names a job and `started`, how many of its attempts had started when it was rung (jobs.attempt then):
the claim it leads to starts attempt `started + 1`, and only while the row still says `started`. Everywhere else
`attempt` is an attempt's own number, 1 for the first.

The doorbell is a Lua script rather than arq's `ArqRedis.enqueue_job`: that one WATCHes the job key, checks it
and the result key with EXISTS, then writes in MULTI/PSETEX/ZADD/EXEC, three round trips through redis-py
(≈ 320 µs of client CPU a call, on every submit). The script does the same check-and-write in one round trip
and stores exactly what enqueue_job would, in arq's own format, so arq's unchanged Worker reads and runs it.

Whatever puts a message in the queue or asks for an abort also publishes on `channel(redis)` in the same round
trip: an idle worker's poll waits for that (worker/wake.py) instead of polling every 50 ms.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple
from uuid import UUID

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_ms
from redis.asyncio import Redis

from worker import metrics
from worker.connections import QUEUE, REDIS_DOWN, script, serialize

RUN_JOB = "run_job"


def message(job_id: UUID, started: int) -> str:
    return f"{job_id}:{started}"


def arq_job_timeout_s(max_timeout_s: int) -> int:
    """arq's own timeout of a message: never the one that stops a job (run_job enforces each job's timeout_s)."""
    return max_timeout_s + 60


def in_progress_mark_s(max_timeout_s: int) -> float:
    """How long arq marks a message it took as in progress: its `in_progress_timeout_s`, job_timeout + 10."""
    return arq_job_timeout_s(max_timeout_s) + 10


def channel(redis: Redis) -> str:
    """The doorbell's channel. Pub/sub ignores database numbers: deployments that share a Redis server by index
    must not wake each other's workers."""
    return f"{QUEUE}:doorbell:{redis.connection_pool.connection_kwargs.get('db', 0)}"


def parse_message(text: str) -> tuple[UUID, int]:
    job_id, _, started = text.partition(":")
    return UUID(job_id), int(started)


# arq 0.28's enqueue_job for many jobs in one round trip. ARGV: the clock and the fairness window and step (ms),
# arq's job and result key prefixes, two packed arguments: a msgpack array with one array per job (message id,
# expiry ms, score, tenant ('' for none), rank offset ms, promote, length of its serialized job), and every job's
# serialized job end to end; then the doorbell's channel. Two arguments rather than nine a job: redis-py packs each
# argument in Python, and for a batch of 1,000 that packing cost more than the script. The script names the job's
# keys itself, where KEYS should: arq runs on one Redis node (it has no Cluster support), where a script may touch
# any key.
#
# While either key of a job exists its id is taken (queued, running or kept as a result): that job changes nothing,
# except that a promoted one (rung early with a delay, due now) moves up to its rank if that is ahead of where it
# waits. A tenant given: its jobs are spread over the window. Each takes the tenant's next virtual time, a step
# after its last, never before `now - window` nor after `now`; so a tenant that rings 2,000 at once takes the front
# only for its first window / step, and one that rings ten a moment later slots in among them rather than behind.
# Anything written, the workers' poll is woken: one message, whatever the number of jobs.
ENQUEUE_LUA = """
local now, window, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local job_prefix, result_prefix, serialized = ARGV[4], ARGV[5], ARGV[7]
local offset, fair, rung = 1, {}, false  -- fair: each tenant's next virtual time, read and written once a call
for _, job in ipairs(cmsgpack.unpack(ARGV[6])) do
    local id, expiry, score, tenant, rank, promote, length = unpack(job)
    local job_key = job_prefix .. id
    local held = redis.call('EXISTS', job_key, result_prefix .. id) > 0
    if not held or promote then
        if tenant ~= '' then
            local vt = fair[tenant] or tonumber(redis.call('GET', 'outlast:fair:' .. tenant) or '0')
            vt = math.max(vt, now - window)
            fair[tenant] = vt + step
            score = math.min(vt, score)
        end
        score = score - rank
        rung = true
        if held then
            redis.call('ZADD', KEYS[1], 'XX', 'LT', score, id)
        else
            local job = string.sub(serialized, offset, offset + length - 1)
            redis.call('PSETEX', job_key, string.format('%d', expiry), job)
            redis.call('ZADD', KEYS[1], score, id)
        end
    end
    offset = offset + length
end
for tenant, vt in pairs(fair) do
    redis.call('SET', 'outlast:fair:' .. tenant, tostring(vt), 'PX', math.ceil(window + step))
end
if rung then
    redis.call('PUBLISH', ARGV[8], '')
end
return 1
"""

# Each priority level is worth this much waiting (OUTLAST_PRIORITY_STEP_S): a job at -10 behind a steady stream at
# 10 starts within 20 steps. Fairness among tenants spreads a burst over a sixth of a step, a 200th of that per job.
PRIORITY_STEP_S = 60.0
FAIR_SPREAD = 200


class Bell(NamedTuple):
    """A doorbell for attempt `started + 1` of a job. `priority` None: the message is scored as arq's enqueue_job
    scores it (by when it is due); otherwise, when it is due now, it ranks by priority and, with `tenant`, fairly
    among tenants. A bell rung with a delay is scored by its time: the sweep ranks it once it is due."""

    job_id: UUID
    started: int
    priority: int | None = None
    tenant: str | None = None
    delay_s: float = 0.0
    promote: bool = False  # its message may wait in Redis at a rank below its own (rung early, due now): move it up


async def enqueue(
    redis: ArqRedis, job_id: UUID, started: int, *, delay_s: float = 0.0, priority: int | None = None
) -> bool:
    """Ring the doorbell for attempt `started + 1`. False when Redis is unreachable (the row stays the truth).

    One arq job id per attempt: arq ignores a duplicate while it still holds that id, so the sweep may
    ring again freely, and a rescued job's new attempt is never blocked by the old one's keys. A duplicate
    is still True: the message Redis holds for that id rings the same doorbell.
    """
    return await enqueue_many(redis, [Bell(job_id, started, priority, delay_s=delay_s)])


def _rank_ms(bell: Bell, step_s: float) -> int:
    if bell.priority is None or bell.delay_s > 0:
        return 0
    return to_ms((bell.priority + 10) * step_s)


async def enqueue_many(
    redis: ArqRedis, bells: Sequence[Bell | tuple[UUID, int]], *, step_s: float = PRIORITY_STEP_S
) -> bool:
    """`enqueue` for each bell (or `(job_id, started)`), in one round trip: all rung, or (Redis unreachable) none.

    What arq's `enqueue_job(RUN_JOB, text, _job_id=text, _queue_name=QUEUE, _defer_by=delay_s)` stores: the job
    (enqueue time from this process's clock, as arq takes it) under arq's job key, expiring a day
    (`expires_extra_ms`) after it is due, and its id in the queue scored by when it is due, less its rank: arq
    takes the lowest scores first, so a higher priority is an earlier score, never a later one than now.
    """
    if not bells:
        return True
    enqueued_ms = timestamp_ms()
    window_ms = to_ms(step_s / 6)
    jobs: list[tuple[str, int, int, str, int, bool, int]] = []
    serialized: list[bytes] = []
    for item in bells:
        bell = item if isinstance(item, Bell) else Bell(*item)
        text = message(bell.job_id, bell.started)
        score = enqueued_ms + to_ms(bell.delay_s)
        expiry_ms = score - enqueued_ms + redis.expires_extra_ms
        fair = bell.tenant if bell.priority is not None and bell.delay_s <= 0 and bell.tenant else ""
        job = serialize_job(RUN_JOB, (text,), {}, None, enqueued_ms, serializer=serialize)
        jobs.append((text, expiry_ms, score, fair, _rank_ms(bell, step_s), bell.promote, len(job)))
        serialized.append(job)
    spread_ms = max(1, window_ms // FAIR_SPREAD)
    args: list[bytes | int | str] = [
        enqueued_ms,
        window_ms,
        spread_ms,
        job_key_prefix,
        result_key_prefix,
        serialize(jobs),
        b"".join(serialized),
        channel(redis),
    ]
    try:
        await script(redis, ENQUEUE_LUA)([QUEUE], args)
    except REDIS_DOWN:
        metrics.redis_errors.inc()
        return False
    return True


async def request_abort(redis: ArqRedis, job_id: UUID, attempt: int) -> bool:
    """Ask the worker running attempt `attempt` to cancel its task now, rather than at its next heartbeat.

    The running attempt was started by message `attempt - 1`.
    """
    return await request_abort_many(redis, [(job_id, attempt)])


async def request_abort_many(redis: ArqRedis, attempts: Sequence[tuple[UUID, int]]) -> bool:
    """`request_abort` for each `(job_id, attempt)`, in one round trip, waking the workers' poll (arq reads the
    aborts there). False when Redis is unreachable."""
    now_ms = time.time() * 1000
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zadd(abort_jobs_ss, {message(job_id, attempt - 1): now_ms for job_id, attempt in attempts})
            pipe.publish(channel(redis), b"")
            await pipe.execute()
    except REDIS_DOWN:
        metrics.redis_errors.inc()
        return False
    return True


async def ring_again(
    redis: ArqRedis, bell: Bell, *, mark_s: float, stale_after_s: float, step_s: float = PRIORITY_STEP_S
) -> bool:
    """The sweep's enqueue, for a row still queued long after its last dispatch, or rung before it was due and due
    now (then its message, still waiting in Redis, moves up to its rank).

    A message arq marked in progress more than `stale_after_s` ago for such a row was taken by a worker that died
    before its claim: arq keeps that mark for a day (`mark_s`) and ignores a re-enqueue of the same id meanwhile,
    so it is cleared first. A younger mark is a live worker's, between taking the message and its claim's commit:
    left alone, and nothing is rung. Clearing it would let arq start the same id again while the first run is in
    its task table, and the two runs' clean-ups collide (`KeyError: '<id>:0'` at arq's `del self.job_tasks`,
    counted in `j_failed`, though the job itself succeeds). Should that worker die all the same, the next pass
    finds the mark old enough.
    """
    text = message(bell.job_id, bell.started)
    try:
        left_ms = await redis.pttl(in_progress_key_prefix + text)  # -2: no mark, -1: a mark without expiry
        if left_ms != -2:
            if left_ms >= 0 and mark_s - left_ms / 1000 < stale_after_s:
                return True  # being claimed right now
            await redis.delete(in_progress_key_prefix + text, job_key_prefix + text)
    except REDIS_DOWN:
        metrics.redis_errors.inc()
        return False
    return await enqueue_many(redis, [bell], step_s=step_s)


async def forget(redis: ArqRedis, lost: list[tuple[UUID, int]]) -> None:
    """Drop the messages of attempts whose worker died. arq would keep each one marked in progress for a day at
    the head of the queue, and it reads only the first few hundred ids a poll: enough dead ones stall every worker."""
    if not lost:
        return
    texts = [message(job_id, attempt - 1) for job_id, attempt in lost]  # attempt n was started by message n - 1
    keys = [prefix + text for text in texts for prefix in (in_progress_key_prefix, job_key_prefix, retry_key_prefix)]
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zrem(QUEUE, *texts)
            pipe.delete(*keys)
            await pipe.execute()
    except REDIS_DOWN:
        pass  # Redis is down: when the sweep re-dispatches these jobs, ring_again clears a stale mark anyway
