"""worker/events.py: publishing, what status events hold, `ctx.log` lines, and following through a shared Feed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID

import httpx
import msgspec
from redis.asyncio import Redis

from tests.test_store import events as stored_events
from worker import Config, Deps, events

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
