"""Rate limits (server/limits.py): 429 with Retry-After."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import msgspec

from server.app import create_app
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
