"""The doorbell: enqueue(job_id, started), and arq's other keys the engine touches (abort, the sweep's clean-ups).

A message names a job and `started`, how many of its attempts had started when it was rung (jobs.attempt then):
the claim it leads to starts attempt `started + 1`, and only while the row still says `started`. Everywhere else
`attempt` is an attempt's own number, 1 for the first.

The doorbell is a Lua script rather than arq's `ArqRedis.enqueue_job`: that one WATCHes the job key, checks it
and the result key with EXISTS, then writes in MULTI/PSETEX/ZADD/EXEC, three round trips through redis-py
(≈ 320 µs of client CPU a call, on every submit). The script does the same check-and-write in one round trip
and stores exactly what enqueue_job would, in arq's own format, so arq's unchanged Worker reads and runs it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from uuid import UUID

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_ms

from worker.connections import QUEUE, REDIS_DOWN, script, serialize

RUN_JOB = "run_job"


def message(job_id: UUID, started: int) -> str:
    return f"{job_id}:{started}"


def parse_message(text: str) -> tuple[UUID, int]:
    job_id, _, started = text.partition(":")
    return UUID(job_id), int(started)


# arq 0.28's enqueue_job for many jobs in one round trip. KEYS: the queue, then each job's job key and result key.
# ARGV: four per job: serialized job, expiry ms, score, job id. While either key of a job exists its id is taken
# (queued, running or kept as a result): that job changes nothing.
ENQUEUE_LUA = """
for i = 0, #ARGV / 4 - 1 do
    local job_key, result_key = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
    if redis.call('EXISTS', job_key, result_key) == 0 then
        redis.call('PSETEX', job_key, ARGV[4 * i + 2], ARGV[4 * i + 1])
        redis.call('ZADD', KEYS[1], ARGV[4 * i + 3], ARGV[4 * i + 4])
    end
end
return 1
"""


async def enqueue(redis: ArqRedis, job_id: UUID, started: int, *, delay_s: float = 0.0) -> bool:
    """Ring the doorbell for attempt `started + 1`. False when Redis is unreachable (the row stays the truth).

    One arq job id per attempt: arq ignores a duplicate while it still holds that id, so the sweep may
    ring again freely, and a rescued job's new attempt is never blocked by the old one's keys. A duplicate
    is still True: the message Redis holds for that id rings the same doorbell.
    """
    return await enqueue_many(redis, [(job_id, started)], delay_s=delay_s)


async def enqueue_many(redis: ArqRedis, messages: Sequence[tuple[UUID, int]], *, delay_s: float = 0.0) -> bool:
    """`enqueue` for each `(job_id, started)`, in one round trip: all rung, or (Redis unreachable) none.

    What arq's `enqueue_job(RUN_JOB, text, _job_id=text, _queue_name=QUEUE, _defer_by=delay_s)` stores: the job
    (enqueue time from this process's clock, as arq takes it) under arq's job key, expiring a day
    (`expires_extra_ms`) after it is due, and its id in the queue scored by when it is due.
    """
    enqueued_ms = timestamp_ms()
    score = enqueued_ms + to_ms(delay_s)
    expiry_ms = score - enqueued_ms + redis.expires_extra_ms
    keys: list[str] = [QUEUE]
    args: list[bytes | int | str] = []
    for job_id, started in messages:
        text = message(job_id, started)
        keys += [job_key_prefix + text, result_key_prefix + text]
        args += [serialize_job(RUN_JOB, (text,), {}, None, enqueued_ms, serializer=serialize), expiry_ms, score, text]
    try:
        await script(redis, ENQUEUE_LUA)(keys, args)
    except REDIS_DOWN:
        return False
    return True


async def request_abort(redis: ArqRedis, job_id: UUID, attempt: int) -> bool:
    """Ask the worker running attempt `attempt` to cancel its task now, rather than at its next heartbeat.

    The running attempt was started by message `attempt - 1`.
    """
    return await request_abort_many(redis, [(job_id, attempt)])


async def request_abort_many(redis: ArqRedis, attempts: Sequence[tuple[UUID, int]]) -> bool:
    """`request_abort` for each `(job_id, attempt)`, in one round trip. False when Redis is unreachable."""
    now_ms = time.time() * 1000
    try:
        await redis.zadd(abort_jobs_ss, {message(job_id, attempt - 1): now_ms for job_id, attempt in attempts})
    except REDIS_DOWN:
        return False
    return True


async def ring_again(redis: ArqRedis, job_id: UUID, started: int) -> bool:
    """The sweep's enqueue, for a row still queued long after its last dispatch.

    A message arq marked in progress for such a row was taken by a worker that died before its claim: arq
    keeps that mark for a day and ignores a re-enqueue of the same id meanwhile, so it is cleared first. Should
    the worker be alive after all, the duplicate it competes with loses at the guarded claim.
    """
    text = message(job_id, started)
    try:
        if await redis.exists(in_progress_key_prefix + text):
            await redis.delete(in_progress_key_prefix + text, job_key_prefix + text)
    except REDIS_DOWN:
        return False
    return await enqueue(redis, job_id, started)


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
