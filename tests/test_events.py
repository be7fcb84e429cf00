"""worker/events.py: what status events hold, `ctx.log` lines, publishing, and following through a shared Feed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from server.follow import FEED_CACHE, Hub
from tests import engine
from tests.conftest import eventually, notified
from tests.test_store import OWNER, new_job
from tests.test_store import events as stored_events
from worker import Config, Deps, events, resource, store
from worker.heartbeat import LOG_MAX_CHARS, LOG_MAX_PENDING, Heartbeat, Pulse
from worker.job import Progress

Drain = Callable[[], Awaitable[None]]


async def test_a_status_event_renders_as_the_job_with_times_in_utc(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    async with deps.db.transaction():
        await deps.db.execute("SET LOCAL TIME ZONE 'Asia/Kolkata'")  # jsonb then writes +05:30 offsets
        await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    row = await store.get_job(deps.db, "default", job_id)
    assert row is not None
    running = (await events.read_after(deps.db, job_id, 1))[0]
    assert b"+05:30" in running.data
    job = resource.status_job(row, running.data)
    assert job.status == "running" and job.started_at == row.started_at
    assert row.started_at is not None
    assert f'"started_at":"{row.started_at:%Y-%m-%dT%H:%M:%S.%f}Z"'.encode() in msgspec.json.encode(job)


async def test_log_lines_of_a_job_are_events_written_before_its_end(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    lines = [["info", "starting"], ["warning", "slow upstream"], ["error", "gave up on one item"]]
    response = await client.post("/v1/jobs", json={"type": "chatty", "input": {"lines": lines}})
    await drain()
    log = await stored_events(deps, UUID(response.json()["id"]))
    assert [(name, data.get("status")) for _, name, data in log][-4:] == [
        ("log", None),
        ("log", None),
        ("log", None),
        ("status", "succeeded"),
    ]
    assert [[d["level"], d["message"]] for _, name, d in log if name == "log"] == lines


async def test_an_unknown_log_level_fails_the_job_as_its_own_bug(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    response = await client.post("/v1/jobs", json={"type": "chatty", "input": {"lines": [["verbose", "hi"]]}})
    await drain()
    job = (await client.get(f"/v1/jobs/{response.json()['id']}")).json()
    assert job["status"] == "failed" and "log level must be one of" in job["error"]["message"]


@contextlib.asynccontextmanager
async def a_running_attempt(deps: Deps) -> AsyncIterator[Heartbeat]:
    """A claimed job's attempt, its heartbeat on a pulse of its own: what the worker's run gives a job's code."""
    claimed = await engine.claim_one(deps.jobs, await new_job(deps.db), 0, owner=OWNER, lease_s=30)
    assert claimed is not None
    pulse = Pulse(deps)
    beat = pulse.attach(claimed, leased_at=time.monotonic())
    try:
        yield beat
    finally:
        beat.stop()
        await pulse.aclose()


async def test_a_flood_of_log_lines_is_thinned_and_long_lines_are_cut(deps: Deps) -> None:
    async with a_running_attempt(deps) as beat:

        async def flood() -> None:
            for i in range(LOG_MAX_PENDING + 50):
                beat.log("debug", f"{i} " + "x" * 5_000)

        await beat.around(flood())  # its last lines are written before it returns
    logged = [data for _, name, data in await stored_events(deps, beat.id) if name == "log"]
    assert len(logged) == LOG_MAX_PENDING + 1
    assert all(len(d["message"]) == LOG_MAX_CHARS for d in logged[:-1])
    assert logged[-1] == {"level": "warning", "message": f"50 log lines dropped: over {LOG_MAX_PENDING} per write"}


async def test_progress_and_log_lines_are_written_in_the_order_the_code_reported_them(deps: Deps) -> None:
    """One writer for both: a progress reported before a line comes before it in the log, and after it, after."""
    async with a_running_attempt(deps) as beat:

        async def code() -> None:
            beat.report(Progress(0.1, "a"))
            beat.report(Progress(0.2, "b"))  # a run of reports collapses into its latest
            beat.log("info", "one")
            beat.report(Progress(0.3, "c"))
            beat.log("info", "two")

        await beat.around(code())
    written = [(n, d.get("message")) for _, n, d in await stored_events(deps, beat.id) if n in ("progress", "log")]
    assert written == [("progress", "b"), ("log", "one"), ("progress", "c"), ("log", "two")]


async def test_log_lines_of_an_attempt_that_is_over_are_not_written(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    assert await engine.beat(deps.jobs, job_id, 1, lease_s=30, logs=[("info", "while running")]) == "renewed"
    await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"1")
    assert await engine.beat(deps.jobs, job_id, 1, lease_s=30, logs=[("info", "too late")]) == "superseded"
    assert await engine.beat(deps.jobs, job_id, 0, lease_s=30, logs=[("info", "an old attempt")]) == "superseded"
    assert [d.get("message") for _, n, d in await stored_events(deps, job_id) if n == "log"] == ["while running"]


async def test_the_worker_publishes_each_change_of_a_job_it_runs(
    client: httpx.AsyncClient, deps: Deps, drain: Drain, redis: Redis
) -> None:
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(events.channel(redis))
        await pubsub.get_message(timeout=5.0)  # takes the confirmation of the subscription itself
        job_id = (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.3, "steps": 2}})).json()
        await drain()
        heard = []
        while (message := await pubsub.get_message(timeout=1.0)) is not None:
            heard.append(message["data"].decode())
    changes = [name for _, name, _ in await stored_events(deps, UUID(job_id["id"]))][1:]  # all but the submit
    # one notification per commit (the log line and progress may share one; none may be missing)
    assert set(heard) == {job_id["id"]} and 3 <= len(heard) <= len(changes)


async def test_a_notifier_names_every_job_notified_before_it_publishes_in_one_message(deps: Deps, redis: Redis) -> None:
    ids = [UUID(int=n) for n in range(1, 51)]
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(events.channel(redis))
        await pubsub.get_message(timeout=5.0)  # the confirmation of the subscription itself
        notifier = events.Notifier(deps.redis)
        for job_id in ids + ids[:10]:  # a job notified twice (claimed, then done) is named once
            notifier.notify(job_id)
        await notifier.flush()
        heard = []
        while (message := await pubsub.get_message(timeout=1.0)) is not None:
            heard.append(message["data"])
    assert len(heard) == 1
    assert sorted(heard[0].split()) == sorted(str(i).encode() for i in ids)


async def test_notifying_without_redis_never_fails_the_caller(config: Config) -> None:
    from worker.connections import open_redis

    redis = open_redis(msgspec.structs.replace(config, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5))
    try:
        notifier = events.Notifier(redis)
        notifier.notify(UUID(int=1))
        notifier.notify(None)
        await notifier.flush()
    finally:
        await redis.aclose(close_connection_pool=True)


# -- following --------------------------------------------------------------------------------------


@pytest.fixture
async def hub(config: Config, deps: Deps) -> Hub:
    async with Hub(deps.db, config.redis_url, poll_s=3600, timeout_s=2) as hub:
        await eventually(lambda: _subscribed(hub))
        yield hub  # type: ignore[misc]


async def _subscribed(hub: Hub) -> bool | None:
    return hub.subscribed or None


async def _write_logs(deps: Deps, job_id: UUID, count: int, *, start: int = 0) -> None:
    for first in range(start, start + count, 50):
        lines = [("info", str(i)) for i in range(first, min(first + 50, start + count))]
        assert await engine.beat(deps.jobs, job_id, 1, lease_s=30, logs=lines) == "renewed"
        await notified(deps, job_id)


async def test_a_fast_and_a_slow_follower_both_get_every_event_once_in_order(deps: Deps, hub: Hub) -> None:
    job_id = await new_job(deps.db)
    await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    total = 2 + 3 * FEED_CACHE + 1  # queued, running, more than the shared cache holds, and the end

    async def follow(pause_every: int) -> list[int]:
        seen = []
        with hub.follow(job_id) as follower:
            until = asyncio.get_running_loop().time() + 60
            async for event in follower.events(0, until=until, tick_s=3600):
                seen.append(event.seq)
                if len(seen) % pause_every == 0:
                    await asyncio.sleep(0.01)  # a reader that falls behind the shared cache
        return seen

    fast, slow = asyncio.create_task(follow(10_000)), asyncio.create_task(follow(100))
    await eventually(lambda: _followers(hub, job_id, 2))
    await _write_logs(deps, job_id, 3 * FEED_CACHE)
    assert await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"1")
    await notified(deps, job_id)
    assert await asyncio.wait_for(fast, 30) == list(range(1, total + 1))
    assert await asyncio.wait_for(slow, 30) == list(range(1, total + 1))
    assert hub.followed == 0


async def _followers(hub: Hub, job_id: UUID, count: int) -> bool | None:
    return hub.following(job_id) == count or None


async def test_a_follower_stopped_by_a_shutdown_ends_at_once(deps: Deps, hub: Hub) -> None:
    job_id = await new_job(deps.db)
    with hub.follow(job_id) as follower:
        following = follower.events(0, until=asyncio.get_running_loop().time() + 3600, tick_s=3600)
        assert (await anext(following)).seq == 1
        waiting = asyncio.ensure_future(anext(following))
        follower.stop()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 15)


async def test_a_message_naming_many_jobs_wakes_the_followers_of_each(deps: Deps, hub: Hub) -> None:
    first, second = await new_job(deps.db), await new_job(deps.db)
    with hub.follow(first) as one, hub.follow(second) as other:
        one.clear()
        other.clear()
        await deps.redis.publish(events.channel(deps.redis), f"{UUID(int=7)} {first} {second}".encode())
        until = asyncio.get_running_loop().time() + 10
        assert await one.wait(until) and await other.wait(until)


async def test_reading_many_logs_at_once_gives_each_job_its_events_after_its_own_seq(deps: Deps) -> None:
    first, second, quiet = await new_job(deps.db), await new_job(deps.db), await new_job(deps.db)
    for job_id in (first, second):
        await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    assert await store.finish(deps.jobs, second, 1, "succeeded", result=b"1")
    found = await events.read_many(deps.db, [(first, 0), (second, 1), (quiet, 1)])
    assert {job_id: [(e.seq, e.final) for e in got] for job_id, got in found.items()} == {
        first: [(1, False), (2, False)],
        second: [(2, False), (3, True)],
    }  # the quiet job, with nothing after its seq, is left out
    limited = await events.read_many(deps.db, [(first, 0), (second, 0)], limit=1)
    assert {job_id: [e.seq for e in got] for job_id, got in limited.items()} == {first: [1], second: [1]}


async def test_the_followers_of_many_jobs_notified_together_each_get_their_own_jobs_events(
    deps: Deps, hub: Hub
) -> None:
    jobs = [await new_job(deps.db) for _ in range(30)]
    for job_id in jobs:
        await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    until = asyncio.get_running_loop().time() + 60
    async with contextlib.AsyncExitStack() as stack:
        streams = {}
        for job_id in jobs:
            follower = stack.enter_context(hub.follow(job_id))
            streams[job_id] = await stack.enter_async_context(
                contextlib.aclosing(follower.events(0, until=until, tick_s=3600))
            )
        for following in streams.values():  # queued and running, from each follower's own first read
            assert [getattr(await anext(following), "seq", None) for _ in range(2)] == [1, 2]
        for job_id in jobs:
            lines = [("info", f"{job_id} line {k}") for k in range(3)]
            assert await engine.beat(deps.jobs, job_id, 1, lease_s=30, logs=lines) == "renewed"
            deps.notifier.notify(job_id)
        await deps.notifier.flush()
        for job_id, following in streams.items():
            got = [await asyncio.wait_for(anext(following), 15) for _ in range(3)]
            assert [(e.seq, e.name) for e in got if e is not None] == [(3, "log"), (4, "log"), (5, "log")]
            assert all(e is not None and str(job_id).encode() in e.data for e in got)
