"""worker/events.py: publishing, what status events hold, `ctx.log` lines, and following through a shared Feed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID

import httpx
import msgspec
from redis.asyncio import Redis

from tests.test_store import OWNER, new_job
from tests.test_store import events as stored_events
from worker import Config, Deps, events, store
from worker.events import LOG_MAX_CHARS, LOG_MAX_PENDING, Journal, LogLine

Drain = Callable[[], Awaitable[None]]


async def test_publishing_without_redis_never_fails_the_caller(config: Config) -> None:
    from worker.queue import open_redis

    redis = open_redis(msgspec.structs.replace(config, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5))
    try:
        await events.publish(redis, UUID(int=1))
    finally:
        await redis.aclose(close_connection_pool=True)


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
    # one notification per published commit: at least the claim, a progress write and the finish
    assert set(heard) == {job_id["id"]} and 3 <= len(heard) <= len(changes)


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


async def test_a_flood_of_log_lines_is_thinned_and_long_lines_are_cut(deps: Deps) -> None:
    job_id = await new_job(deps)
    await store.claim(deps.db, job_id, 0, owner=OWNER, lease_s=30)
    journal = Journal(deps.db, deps.redis, job_id, 1, interval_s=0.25)
    for i in range(LOG_MAX_PENDING + 50):
        journal.write("debug", f"{i} " + "x" * 5_000)
    await journal.flush()
    logged = [data for _, name, data in await stored_events(deps, job_id) if name == "log"]
    assert len(logged) == LOG_MAX_PENDING + 1
    assert all(len(d["message"]) == LOG_MAX_CHARS for d in logged[:-1])
    assert logged[-1] == {"level": "warning", "message": f"50 log lines dropped: over {LOG_MAX_PENDING} per write"}


async def test_log_lines_of_an_attempt_that_is_over_are_not_written(deps: Deps) -> None:
    job_id = await new_job(deps)
    await store.claim(deps.db, job_id, 0, owner=OWNER, lease_s=30)
    assert await events.append_logs(deps.db, job_id, 1, [LogLine("info", "while running")])
    await store.finish(deps.db, job_id, 1, "succeeded", result=b"1")
    assert not await events.append_logs(deps.db, job_id, 1, [LogLine("info", "too late")])
    assert not await events.append_logs(deps.db, job_id, 0, [LogLine("info", "an old attempt")])
    assert [d.get("message") for _, n, d in await stored_events(deps, job_id) if n == "log"] == ["while running"]
