"""Tenants: every job belongs to its key's tenant, and another tenant's id answers exactly like an unknown one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from server.app import create_app
from tests.conftest import bearer
from worker import Config, Deps, keys

SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}
# Every route that takes a job id.
BY_ID = [
    ("GET", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/result"),
    ("GET", "/v1/jobs/{id}/events"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/deliveries"),
    ("POST", "/v1/jobs/{id}/deliveries/redeliver"),
]


@pytest.fixture
async def tenants(config: Config, deps: Deps) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Clients of tenants `alpha` and `beta`, on one app."""
    alpha, beta = await keys.create(deps.db, "alpha"), await keys.create(deps.db, "beta")
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(alpha)) as a,
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(beta)) as b,
        ):
            yield a, b


def normalized(response: httpx.Response, job_id: str) -> tuple[int, str, bytes]:
    """What a caller can see, with the id it asked for taken out (a 404 for a route may name its path)."""
    return response.status_code, response.headers["content-type"], response.content.replace(job_id.encode(), b"ID")


async def test_another_tenants_ids_answer_exactly_like_unknown_ids_on_every_route(
    tenants: tuple[httpx.AsyncClient, httpx.AsyncClient], drain: Callable[[], Awaitable[None]]
) -> None:
    alpha, beta = tenants
    done = (await alpha.post("/v1/jobs", json=SQUARES)).json()["id"]
    await drain()
    failed = (await alpha.post("/v1/jobs", json={"type": "refuse", "max_attempts": 1})).json()["id"]
    await drain()
    queued = (await alpha.post("/v1/jobs", json=SQUARES)).json()["id"]
    calls = 0
    for job_id in (done, failed, queued):
        for method, path in BY_ID:
            unknown = str(uuid.uuid4())
            theirs = await beta.request(method, path.replace("{id}", job_id))
            nobodys = await beta.request(method, path.replace("{id}", unknown))
            assert theirs.status_code == 404, (method, path, theirs.text)
            assert normalized(theirs, job_id) == normalized(nobodys, unknown), (method, path)
            calls += 1
    assert calls == 3 * len(BY_ID)
    listed = (await beta.get("/v1/jobs")).json()
    assert listed == {"items": [], "next_cursor": None}
    for status in ("succeeded", "failed", "queued"):
        assert (await beta.get("/v1/jobs", params={"status": status})).json()["items"] == []
    # Beta's cancel changed nothing of alpha's; alpha still sees all three, in its own list.
    assert (await alpha.get(f"/v1/jobs/{queued}")).json()["status"] == "queued"
    assert {j["id"] for j in (await alpha.get("/v1/jobs")).json()["items"]} == {done, failed, queued}


async def test_a_cursor_made_from_another_tenants_id_pages_only_your_own_jobs(
    tenants: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    alpha, beta = tenants
    mine = [(await beta.post("/v1/jobs", json=SQUARES)).json()["id"] for _ in range(2)]
    theirs = (await alpha.post("/v1/jobs", json=SQUARES)).json()["id"]
    page = (await beta.get("/v1/jobs", params={"limit": 1})).json()
    rest = (await beta.get("/v1/jobs", params={"cursor": page["next_cursor"]})).json()
    assert [j["id"] for j in page["items"] + rest["items"]] == mine[::-1]
    assert theirs not in str(page) + str(rest)


async def test_jobs_are_stored_under_the_keys_tenant(
    tenants: tuple[httpx.AsyncClient, httpx.AsyncClient], deps: Deps
) -> None:
    alpha, beta = tenants
    a = (await alpha.post("/v1/jobs", json=SQUARES)).json()["id"]
    b = (await beta.post("/v1/jobs", json=SQUARES)).json()["id"]
    rows = await deps.db.fetch_all("SELECT id, tenant_id FROM jobs ORDER BY id")
    assert {(str(r["id"]), r["tenant_id"]) for r in rows} == {(a, "alpha"), (b, "beta")}
