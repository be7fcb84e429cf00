"""The doorbell: `enqueue` writes in one Lua round trip exactly what arq's `enqueue_job` would, for arq's Worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

import httpx
import msgspec
import pytest
from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import deserialize_job
from arq.worker import Worker

from tests.conftest import eventually, job_row, run_burst
from tests.test_worker import submit
from worker import Config, Deps
from worker.connections import QUEUE, deserialize, open_redis
from worker.queue import RUN_JOB, Bell, enqueue, enqueue_many, in_progress_mark_s, message, ring_again

Drain = Callable[[], Awaitable[None]]
NOW = 1_750_000_000.123  # a frozen clock (s), so both paths stamp the same enqueue time
NOW_MS = 1_750_000_000_123


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """arq's `timestamp_ms`, which both enqueue_job and enqueue read, answers NOW."""
    monkeypatch.setattr("arq.utils.time", lambda: NOW)


async def stored(redis: ArqRedis, text: str) -> tuple[bytes | None, float | None, int]:
    """(the job arq would read, its score in the queue, its job key's TTL in ms)."""
    key = job_key_prefix + text
    return await redis.get(key), await redis.zscore(QUEUE, text), await redis.pttl(key)


@pytest.mark.parametrize("delay_s", [0.0, 30.0])
async def test_enqueue_stores_byte_for_byte_what_arqs_enqueue_job_stores(
    deps: Deps, frozen_clock: None, delay_s: float
) -> None:
    job_id = uuid4()
    text = message(job_id, 3)
    job = await deps.redis.enqueue_job(RUN_JOB, text, _job_id=text, _queue_name=QUEUE, _defer_by=delay_s or None)
    assert job is not None
    arqs_payload, arqs_score, arqs_ttl = await stored(deps.redis, text)
    await deps.redis.flushdb()

    assert await enqueue(deps.redis, job_id, 3, delay_s=delay_s)
    payload, score, ttl = await stored(deps.redis, text)
    assert payload is not None and payload == arqs_payload
    assert score == arqs_score == NOW_MS + delay_s * 1000
    expiry = int(delay_s * 1000) + expires_extra_ms
    assert expiry - 5_000 < arqs_ttl <= expiry and expiry - 5_000 < ttl <= expiry
    assert await deps.redis.zcard(QUEUE) == 1 and await deps.redis.dbsize() == 2  # the job key and the queue


async def test_enqueue_many_stores_for_each_what_arq_stores_and_moves_an_id_still_held_only_when_promoted(
    deps: Deps, frozen_clock: None
) -> None:
    held, first, second = message(uuid4(), 0), message(uuid4(), 0), message(uuid4(), 2)
    await deps.redis.enqueue_job(RUN_JOB, held, _job_id=held, _queue_name=QUEUE, _defer_by=60)
    held_before = await stored(deps.redis, held)
    for text in (first, second):
        await deps.redis.enqueue_job(RUN_JOB, text, _job_id=text, _queue_name=QUEUE)
    arqs = {text: await stored(deps.redis, text) for text in (first, second)}
    await deps.redis.delete(job_key_prefix + first, job_key_prefix + second)
    await deps.redis.zrem(QUEUE, first, second)

    ids = [(UUID(text.partition(":")[0]), int(text.partition(":")[2])) for text in (first, held, second)]
    assert await enqueue_many(deps.redis, ids)
    for text in (first, second):
        payload, score, _ = await stored(deps.redis, text)
        assert (payload, score) == arqs[text][:2] and payload is not None
    assert (await stored(deps.redis, held))[:2] == held_before[:2]  # held: left alone
    job_id, started = ids[1]
    assert await enqueue_many(deps.redis, [Bell(job_id, started, promote=True)])  # rung early, due now
    payload, score, _ = await stored(deps.redis, held)
    assert payload == held_before[0] and score == NOW_MS < (held_before[1] or 0)  # moved up, not rewritten
    assert await deps.redis.zcard(QUEUE) == 3


async def test_what_enqueue_stores_decodes_with_arqs_deserialize_job_as_a_run_job_call(deps: Deps) -> None:
    job_id, other = uuid4(), uuid4()
    assert await enqueue(deps.redis, job_id, 0)
    await deps.redis.enqueue_job(RUN_JOB, message(other, 0), _job_id=message(other, 0), _queue_name=QUEUE)
    ours, _, _ = await stored(deps.redis, message(job_id, 0))
    arqs, _, _ = await stored(deps.redis, message(other, 0))
    assert ours is not None and arqs is not None

    job, arq_job = deserialize_job(ours, deserializer=deserialize), deserialize_job(arqs, deserializer=deserialize)
    assert (job.function, job.args, job.kwargs, job.job_try) == (RUN_JOB, [message(job_id, 0)], {}, None)
    assert (arq_job.function, arq_job.args, arq_job.kwargs, arq_job.job_try) == (RUN_JOB, [message(other, 0)], {}, None)
    assert abs((job.enqueue_time - arq_job.enqueue_time).total_seconds()) < 5
    assert msgspec.msgpack.decode(ours).keys() == msgspec.msgpack.decode(arqs).keys() == {"t", "f", "a", "k", "et"}


async def test_a_later_second_enqueue_of_an_id_still_held_changes_nothing_and_is_true(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = uuid4()
    assert await enqueue(deps.redis, job_id, 1)
    first = await stored(deps.redis, message(job_id, 1))
    later = time.time() + 3600
    monkeypatch.setattr("arq.utils.time", lambda: later)  # a rewrite would show a new enqueue time and score
    assert await enqueue(deps.redis, job_id, 1, delay_s=60.0)
    payload, score, ttl = await stored(deps.redis, message(job_id, 1))
    assert (payload, score) == first[:2] and ttl <= first[2]
    assert await deps.redis.zcard(QUEUE) == 1


async def test_delay_s_schedules_the_message_that_far_in_the_future(deps: Deps, frozen_clock: None) -> None:
    job_id = uuid4()
    assert await enqueue(deps.redis, job_id, 0, delay_s=30.0)
    payload, score, ttl = await stored(deps.redis, message(job_id, 0))
    assert payload is not None and score == NOW_MS + 30_000
    assert deserialize_job(payload, deserializer=deserialize).enqueue_time.timestamp() == NOW_MS / 1000
    assert expires_extra_ms + 25_000 < ttl <= expires_extra_ms + 30_000  # a day after it is due, as arq keeps it


async def test_an_id_whose_result_arq_keeps_is_not_enqueued(deps: Deps) -> None:
    job_id = uuid4()
    await deps.redis.set(result_key_prefix + message(job_id, 0), b"a result")
    assert await enqueue(deps.redis, job_id, 0)  # a duplicate, like enqueue_job's None: not a failure
    assert await stored(deps.redis, message(job_id, 0)) == (None, None, -2)
    assert await deps.redis.zcard(QUEUE) == 0


async def test_enqueue_loads_its_script_again_after_redis_forgets_it(deps: Deps) -> None:
    assert await enqueue(deps.redis, uuid4(), 0)
    await deps.redis.script_flush()  # as after a restart of Redis: EVALSHA answers NOSCRIPT
    job_id = uuid4()
    assert await enqueue(deps.redis, job_id, 0)
    assert (await stored(deps.redis, message(job_id, 0)))[0] is not None


async def test_enqueue_is_false_and_never_raises_when_redis_is_unreachable(config: Config) -> None:
    redis = open_redis(msgspec.structs.replace(config, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5))
    try:
        assert not await enqueue(redis, uuid4(), 0)
        assert not await enqueue(redis, uuid4(), 0, delay_s=1.0)
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_an_arq_worker_runs_a_job_enqueue_rang_for(client: httpx.AsyncClient, deps: Deps, drain: Drain) -> None:
    job_id = await submit(client, "square_sum", {"data": [3]})  # POST /v1/jobs rings with enqueue
    text = message(UUID(job_id), 0)
    assert (await stored(deps.redis, text))[0] is not None
    await drain()
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["result"] == 9
    assert (await job_row(deps, job_id))["status"] == "succeeded"
    assert await deps.redis.exists(job_key_prefix + text, QUEUE) == 0  # arq took the message and let it go


# -- the sweep's ring_again ---------------------------------------------------------------------------


async def test_a_sweep_ring_while_a_worker_holds_the_message_is_a_quiet_no_op_and_a_dead_holders_mark_is_cleared(
    client: httpx.AsyncClient, deps: Deps, make_worker: Callable[[], Worker]
) -> None:
    """The sweep may find a row still `queued` at the instant between arq taking its message and the claim's
    commit (a delayed job or a retry rung early and due now, or one dispatched long ago). Clearing arq's fresh
    in-progress mark then let arq start the same message id again while the first run was still in its task table:
    the second run's clean-up deleted the first's entry, and the first ended in `KeyError: '<id>:0'`, counted in
    arq's failed jobs though the job succeeded."""
    job_id = UUID(await submit(client, "sleep_once", {"seconds": 1.0}))
    text = message(job_id, 0)
    mark_s = in_progress_mark_s(deps.config.max_timeout_s)
    worker = make_worker()
    burst = asyncio.create_task(run_burst(worker))

    async def running() -> bool | None:
        return (await job_row(deps, job_id))["status"] == "running" or None

    await eventually(running)
    # the sweep's view at its worst: the message is held, and the row (as it read it an instant ago) was queued
    assert await ring_again(deps.redis, Bell(job_id, 0, promote=True), mark_s=mark_s, stale_after_s=15.0)
    assert await deps.redis.exists(in_progress_key_prefix + text) == 1  # the live holder's mark is left alone
    await asyncio.wait_for(burst, 30)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert (await job_row(deps, job_id))["status"] == "succeeded"

    # A worker that died holding a message leaves its mark for a day: one older than stale_after_s is cleared,
    # and the message rung again.
    dead = uuid4()
    await deps.redis.psetex(in_progress_key_prefix + message(dead, 0), int((mark_s - 20) * 1000), b"1")
    assert await ring_again(deps.redis, Bell(dead, 0), mark_s=mark_s, stale_after_s=15.0)
    assert await deps.redis.exists(in_progress_key_prefix + message(dead, 0)) == 0
    assert (await stored(deps.redis, message(dead, 0)))[0] is not None
