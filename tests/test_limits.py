"""Rate limits and request limits (server/limits.py, server/jobs.py): 429 with Retry-After, 408 for a slow body."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from server.app import create_app
from server.limits import stream_slot, take_submit
from server.problems import RateLimited
from tests.conftest import bearer
from worker import Config, Deps, keys

SQUARES = {"type": "square_sum", "input": {"data": [1]}}


@contextlib.asynccontextmanager
async def app_with(config: Config, **changes: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(msgspec.structs.replace(config, **changes))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def assert_rate_limited(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["type"] == "/problems/rate-limited"
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


async def test_submits_past_a_keys_burst_get_429_with_retry_after_and_other_keys_are_unaffected(
    config: Config, deps: Deps, api_key: str
) -> None:
    other = await keys.create(deps.db, "default")
    async with app_with(config, submit_rate_per_s=0.5, submit_burst=3) as client:
        for _ in range(3):
            assert (await client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))).status_code == 202
        refused = await client.post("/v1/jobs", json=SQUARES, headers=bearer(api_key))
        assert assert_rate_limited(refused) == 2  # one token at 0.5/s
        assert (await client.post("/v1/jobs", json=SQUARES, headers=bearer(other))).status_code == 202
        assert (await client.get("/v1/jobs", headers=bearer(api_key))).status_code == 200  # reads are not submits
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 4


async def test_the_bucket_refills_at_the_rate(redis: Redis, deps: Deps) -> None:
    for _ in range(2):
        await take_submit(redis, "k", rate=20.0, burst=2)
    with pytest.raises(RateLimited):
        await take_submit(redis, "k", rate=20.0, burst=2)
    await asyncio.sleep(0.06)  # one token at 20/s is 50 ms
    await take_submit(redis, "k", rate=20.0, burst=2)


async def test_repeated_auth_failures_from_one_address_get_429_then_even_a_valid_key_waits(
    config: Config, deps: Deps, api_key: str
) -> None:
    async with app_with(config, auth_failures_per_min=3) as client:
        for _ in range(3):
            assert (await client.get("/v1/jobs", headers=bearer(keys.new_key()))).status_code == 401
        assert assert_rate_limited(await client.get("/v1/jobs", headers=bearer(keys.new_key()))) <= 60
        # Blocked for the rest of the minute, before any lookup: a guesser learns nothing more meanwhile.
        assert_rate_limited(await client.get("/v1/jobs", headers=bearer(api_key)))
        assert (await client.get("/healthz")).status_code == 200  # only /v1 is guarded
    # Another address is not affected: the count is per client.
    app = create_app(msgspec.structs.replace(config, auth_failures_per_min=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as elsewhere:
            assert (await elsewhere.get("/v1/jobs", headers=bearer(api_key))).status_code == 200


async def test_the_failure_count_is_shared_by_web_processes(config: Config, deps: Deps) -> None:
    async with app_with(config, auth_failures_per_min=4) as one, app_with(config, auth_failures_per_min=4) as two:
        for client in (one, two, one, two):
            assert (await client.get("/v1/jobs")).status_code == 401
        assert_rate_limited(await two.get("/v1/jobs"))


async def test_stream_slots_cap_open_streams_per_key_and_come_back_on_exit(redis: Redis, deps: Deps) -> None:
    async with stream_slot(redis, "k", limit=2, retry_after=5), stream_slot(redis, "k", limit=2, retry_after=5):
        with pytest.raises(RateLimited) as refused:
            async with stream_slot(redis, "k", limit=2, retry_after=5):
                pass
        assert refused.value.headers["Retry-After"] == "5" and refused.value.status == 429
        async with stream_slot(redis, "other-key", limit=2, retry_after=5):
            pass
    async with stream_slot(redis, "k", limit=2, retry_after=5), stream_slot(redis, "k", limit=2, retry_after=5):
        pass


async def test_a_dead_processs_stream_slots_expire_with_their_lease(redis: Redis, deps: Deps) -> None:
    await redis.zadd("outlast:streams:k", {"held-by-a-process-that-died": 1})  # a lease that ended long ago
    async with stream_slot(redis, "k", limit=1, retry_after=5):
        assert await redis.zcard("outlast:streams:k") == 1


async def test_a_held_slot_is_renewed_past_its_lease(redis: Redis, deps: Deps) -> None:
    async with stream_slot(redis, "k", limit=1, retry_after=5, lease_s=0.3):
        await asyncio.sleep(0.6)  # two leases: only renewal keeps the slot
        with pytest.raises(RateLimited):
            async with stream_slot(redis, "k", limit=1, retry_after=5, lease_s=0.3):
                pass


async def test_limits_fail_open_when_redis_is_down(deps: Deps) -> None:
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        await take_submit(down, "k", rate=1.0, burst=1)
        await take_submit(down, "k", rate=1.0, burst=1)
        async with stream_slot(down, "k", limit=1, retry_after=5), stream_slot(down, "k", limit=1, retry_after=5):
            pass
    finally:
        await down.aclose()


async def test_a_body_that_does_not_arrive_in_time_is_408(config: Config, deps: Deps, api_key: str) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"type": "square_sum", '
        await asyncio.sleep(5)
        yield b'"input": {"data": [1]}}'

    async with app_with(config, body_timeout_s=0.3) as client:
        response = await client.post("/v1/jobs", content=trickle(), headers=bearer(api_key))
    assert response.status_code == 408, response.text
    assert response.json()["type"] == "/problems/request-timeout" and response.headers["connection"] == "close"
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0
