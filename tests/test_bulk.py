"""POST /v1/jobs/batch (many jobs, one transaction) and POST /v1/jobs/{id}/retry (a new job from an ended one)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec

from server.submit import BATCH_CHUNK_JOBS
from tests.conftest import bearer
from worker import Config, Deps

Drain = Callable[[], Awaitable[None]]


def item(n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "square_sum", "input": {"data": [n]}, **extra}


async def count_jobs(deps: Deps) -> int:
    return int(await deps.db.fetch_val("SELECT count(*) FROM jobs"))


async def test_a_batch_makes_its_jobs_in_order_and_they_all_run(client: httpx.AsyncClient, drain: Drain) -> None:
    answer = await client.post("/v1/jobs/batch", json={"jobs": [item(n) for n in range(5)]})
    assert answer.status_code == 202, answer.text
    jobs = answer.json()["items"]
    assert [j["input"] for j in jobs] == [{"data": [n]} for n in range(5)]
    assert all(j["status"] == "queued" and j["links"]["events"].count("token=") == 1 for j in jobs)
    await drain()  # one doorbell call rang for all of them
    results = [(await client.get(f"/v1/jobs/{j['id']}")).json()["result"] for j in jobs]
    assert results == [n * n for n in range(5)]


async def test_one_bad_item_refuses_the_whole_batch_naming_it(client: httpx.AsyncClient, deps: Deps) -> None:
    jobs = [item(1), item(2), {"type": "square_sum", "input": {"data": ["three"]}}]
    answer = await client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["loc"] == "$.jobs[2].input.data[0]"
    unknown = await client.post("/v1/jobs/batch", json={"jobs": [item(1), {"type": "nope"}]})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["loc"] == "$.jobs[1].type"
    assert await count_jobs(deps) == 0


async def test_a_batch_over_the_cap_or_empty_is_422(config: Config, deps: Deps, api_key: str) -> None:
    from server.app import create_app

    app = create_app(msgspec.structs.replace(config, max_batch_jobs=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(api_key)) as client:
            over = await client.post("/v1/jobs/batch", json={"jobs": [item(n) for n in range(4)]})
            assert over.status_code == 422 and over.json()["errors"][0]["loc"] == "$.jobs"
            empty = await client.post("/v1/jobs/batch", json={"jobs": []})
            assert empty.status_code == 422 and empty.json()["errors"][0]["loc"] == "$.jobs"
    assert await count_jobs(deps) == 0


async def test_each_item_has_its_own_idempotency_key(client: httpx.AsyncClient, deps: Deps) -> None:
    first = (await client.post("/v1/jobs/batch", json={"jobs": [item(1, idempotency_key="a")]})).json()["items"][0]
    again = await client.post(
        "/v1/jobs/batch",
        json={"jobs": [item(1, idempotency_key="a"), item(2, idempotency_key="b"), item(2, idempotency_key="b")]},
    )
    assert again.status_code == 202, again.text
    replayed, made, same = again.json()["items"]
    assert replayed["id"] == first["id"] and made["id"] == same["id"] != first["id"]
    assert await count_jobs(deps) == 2


async def test_a_key_reused_with_another_request_rolls_the_whole_batch_back(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    await client.post("/v1/jobs/batch", json={"jobs": [item(1, idempotency_key="a")]})
    answer = await client.post(
        "/v1/jobs/batch",
        json={"jobs": [item(5), item(9, idempotency_key="a")]},  # same key, another job
    )
    assert answer.status_code == 422 and answer.json()["type"] == "/problems/idempotency-key-reused"
    assert answer.json()["errors"][0]["loc"] == "$.jobs[1].idempotency_key"
    assert await count_jobs(deps) == 1  # item 0 was not kept


async def test_a_batch_of_several_inserts_is_still_one_transaction(client: httpx.AsyncClient, deps: Deps) -> None:
    """A batch longer than BATCH_CHUNK_JOBS goes in several INSERTs: a bad item after the first of them has been
    written still leaves nothing behind, and the errors name the item by its place in the whole batch."""
    size = 2 * BATCH_CHUNK_JOBS + 10
    bad = [item(n) for n in range(size)]
    bad[size - 3] = {"type": "square_sum", "input": {"data": ["late"]}}
    answer = await client.post("/v1/jobs/batch", json={"jobs": bad})
    assert answer.status_code == 422 and answer.json()["errors"][0]["loc"] == f"$.jobs[{size - 3}].input.data[0]"
    reused = [item(n, idempotency_key=f"k{n}") for n in range(size)]
    reused[size - 1] = item(-1, idempotency_key="k0")  # the first chunk's key, asked for another job
    answer = await client.post("/v1/jobs/batch", json={"jobs": reused})
    assert answer.status_code == 422 and answer.json()["errors"][0]["loc"] == f"$.jobs[{size - 1}].idempotency_key"
    assert await count_jobs(deps) == 0
    again = [item(n % BATCH_CHUNK_JOBS, idempotency_key=f"k{n % BATCH_CHUNK_JOBS}") for n in range(size)]
    answer = await client.post("/v1/jobs/batch", json={"jobs": again})
    assert answer.status_code == 202, answer.text
    ids = [job["id"] for job in answer.json()["items"]]
    assert ids[BATCH_CHUNK_JOBS:] == ids[: size - BATCH_CHUNK_JOBS] and len(set(ids)) == BATCH_CHUNK_JOBS
    assert await count_jobs(deps) == BATCH_CHUNK_JOBS


async def test_retry_makes_a_new_job_from_a_failed_one_and_only_from_an_ended_one(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    failed = (await client.post("/v1/jobs", json={"type": "refuse", "metadata": {"order": 7}})).json()
    ok = (await client.post("/v1/jobs", json=item(3))).json()
    queued_early = await client.post(f"/v1/jobs/{ok['id']}/retry")
    assert queued_early.status_code == 409  # still queued
    await drain()
    retried = await client.post(f"/v1/jobs/{failed['id']}/retry")
    assert retried.status_code == 202, retried.text
    job = retried.json()
    assert job["id"] != failed["id"] and job["retry_of"] == failed["id"] and job["status"] == "queued"
    assert (job["type"], job["input"], job["metadata"]) == ("refuse", {}, {"order": 7})
    assert retried.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (await client.post(f"/v1/jobs/{ok['id']}/retry")).status_code == 409  # succeeded: nothing to retry
    assert (await client.get(f"/v1/jobs/{failed['id']}")).json()["retry_of"] is None


async def test_a_cancelled_job_can_be_retried(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 60}})).json()
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).json()["status"] == "cancelled"
    retried = await client.post(f"/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 202 and retried.json()["retry_of"] == job["id"]


async def test_a_retry_with_an_idempotency_key_makes_one_job_however_often_it_is_sent(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    job = (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 60}})).json()
    other = (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 60}})).json()
    for j in (job, other):
        await client.post(f"/v1/jobs/{j['id']}/cancel")
    key = {"Idempotency-Key": "retry-7"}
    first = await client.post(f"/v1/jobs/{job['id']}/retry", headers=key)
    again = await client.post(f"/v1/jobs/{job['id']}/retry", headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await count_jobs(deps) == 3
    elsewhere = await client.post(f"/v1/jobs/{other['id']}/retry", headers=key)  # the key made another job
    assert elsewhere.status_code == 422 and elsewhere.json()["type"] == "/problems/idempotency-key-reused"
    unkeyed = [(await client.post(f"/v1/jobs/{job['id']}/retry")).json()["id"] for _ in range(2)]
    assert len(set(unkeyed)) == 2 and await count_jobs(deps) == 5
