"""POST /v1/jobs/cancel: the tenant's live jobs that match a filter end (queued) or are asked to stop (running)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests import engine
from tests.conftest import bearer, job_row
from tests.test_cancel import running
from tests.test_store import new_job
from tests.test_worker import submit
from worker import Deps, keys
from worker.bulk import cancel_matching

Drain = Callable[[], Awaitable[None]]


async def statuses(client: httpx.AsyncClient, ids: list[str]) -> list[str]:
    return [(await client.get(f"/v1/jobs/{job_id}")).json()["status"] for job_id in ids]


async def test_the_matching_queued_jobs_end_cancelled_and_the_rest_run(client: httpx.AsyncClient, drain: Drain) -> None:
    acme = [await submit(client, "square_sum", {"data": [n]}, metadata={"customer": "acme", "n": n}) for n in range(3)]
    other = [await submit(client, "square_sum", {"data": [1]}, metadata={"customer": "other"}) for _ in range(2)]
    acme_sleep = await submit(client, "sleep", {"seconds": 0}, metadata={"customer": "acme"})
    answer = await client.post("/v1/jobs/cancel", json={"type": "square_sum", "metadata": {"customer": "acme"}})
    assert (answer.status_code, answer.json()) == (202, {"cancelled": 3})
    job = (await client.get(f"/v1/jobs/{acme[0]}")).json()
    assert job["done"] and job["error"]["type"] == "cancelled"
    await drain()
    assert await statuses(client, acme) == ["cancelled"] * 3
    assert await statuses(client, [*other, acme_sleep]) == ["succeeded"] * 3
    again = await client.post("/v1/jobs/cancel", json={"type": "square_sum"})
    assert again.json() == {"cancelled": 0}  # ended jobs are not cancelled again


async def test_running_jobs_are_asked_to_stop_and_end_cancelled(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    long = [await submit(client, "sleep", {"seconds": 600, "steps": 1}) for _ in range(2)]
    worker = asyncio.create_task(drain())
    for job_id in long:
        await running(deps, job_id)
    answer = await client.post("/v1/jobs/cancel", json={"status": "running"})
    assert (answer.status_code, answer.json()) == (202, {"cancelled": 2})
    await asyncio.wait_for(worker, 15)  # both 600 s jobs stopped
    assert await statuses(client, long) == ["cancelled", "cancelled"]


async def test_a_running_job_already_asked_to_stop_is_not_asked_or_counted_again(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    assert await engine.claim_one(deps.jobs, job_id, 0, owner="test", lease_s=30) is not None  # running, no worker
    assert await cancel_matching(deps.jobs, deps.redis, "default") == 1
    assert (await job_row(deps, job_id))["status"] == "running"  # its own attempt ends it, once told
    assert await cancel_matching(deps.jobs, deps.redis, "default") == 0


async def test_one_call_cancels_at_most_its_limit_and_the_next_call_goes_on(deps: Deps) -> None:
    ids = [await new_job(deps.db) for _ in range(5)]
    assert [await cancel_matching(deps.jobs, deps.redis, "default", limit=2) for _ in range(4)] == [2, 2, 1, 0]
    assert {(await job_row(deps, job_id))["status"] for job_id in ids} == {"cancelled"}


async def test_only_the_callers_tenant_is_cancelled(client: httpx.AsyncClient, deps: Deps) -> None:
    other = bearer(await keys.create(deps.db, "beta"))
    theirs = (await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1]}}, headers=other)).json()[
        "id"
    ]
    mine = await submit(client, "square_sum", {"data": [1]})
    assert (await client.post("/v1/jobs/cancel", json={})).json() == {"cancelled": 1}
    assert (await job_row(deps, mine))["status"] == "cancelled"
    assert (await job_row(deps, theirs))["status"] == "queued"
    assert (await client.post("/v1/jobs/cancel", json={}, headers=other)).json() == {"cancelled": 1}


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"status": "succeeded"}, "$.status"),  # an ended job can't be cancelled
        ({"type": ""}, "$.type"),
        ({"type": "a\u0000b"}, "$.type"),
        ({"metadata": "acme"}, "$.metadata"),
        ({"metadata": {"customer": "a\u0000"}}, "$.metadata"),
        ({"limit": 5}, "$"),  # unknown fields are refused, naming the field in the message
    ],
)
async def test_a_bad_filter_is_a_422_naming_it_and_cancels_nothing(
    client: httpx.AsyncClient, deps: Deps, body: dict[str, Any], loc: str
) -> None:
    job_id = await submit(client, "square_sum", {"data": [1]})
    answer = await client.post("/v1/jobs/cancel", json=body)
    assert answer.status_code == 422 and answer.json()["errors"][0]["loc"] == loc, answer.text
    assert (await job_row(deps, job_id))["status"] == "queued"
