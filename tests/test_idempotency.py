"""Idempotency-Key, as the IETF httpapi draft has it: one job per key and body, a replay flagged, a reuse refused."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest

from tests.conftest import bearer, job_row
from worker import Deps, keys
from worker.connections import QUEUE

SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}
Drain = Callable[[], Awaitable[None]]


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def test_a_replay_returns_the_same_job_flagged_and_a_new_body_is_422(client: httpx.AsyncClient) -> None:
    headers = key()
    first = await client.post("/v1/jobs", json=SQUARES, headers=headers)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = await client.post("/v1/jobs", json=SQUARES, headers=headers)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    other = await client.post("/v1/jobs", json={**SQUARES, "input": {"data": [4]}}, headers=headers)
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    assert other.json()["errors"][0]["loc"] == "Idempotency-Key"


async def test_the_same_job_written_differently_is_a_replay(client: httpx.AsyncClient) -> None:
    headers = key()
    first = await client.post("/v1/jobs", json={**SQUARES, "metadata": {"a": 1, "b": 2}}, headers=headers)
    reordered = b'{"metadata": {"b": 2, "a": 1},  "input": {"data": [1,2,3]}, "type": "square_sum"}'
    again = await client.post("/v1/jobs", content=reordered, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["id"] == first.json()["id"]
    # The defaults it would get anyway make no other job either.
    explicit = {**SQUARES, "metadata": {"a": 1, "b": 2}, "max_attempts": first.json()["max_attempts"]}
    assert (await client.post("/v1/jobs", json=explicit, headers=headers)).json()["id"] == first.json()["id"]
    for changed in ({"max_attempts": 1}, {"timeout_s": 5}, {"metadata": {"a": 1}}, {"type": "cube_sum"}):
        response = await client.post("/v1/jobs", json={**SQUARES, **changed}, headers=headers)
        assert response.status_code == 422, changed


async def test_keys_are_scoped_to_the_tenant(client: httpx.AsyncClient, deps: Deps) -> None:
    headers = key()
    mine = (await client.post("/v1/jobs", json=SQUARES, headers=headers)).json()["id"]
    other_tenant = bearer(await keys.create(deps.db, "acme"))
    theirs = await client.post("/v1/jobs", json={"type": "sleep"}, headers={**headers, **other_tenant})
    assert theirs.status_code == 202 and "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != mine


async def test_a_key_past_its_window_makes_a_new_job(client: httpx.AsyncClient, deps: Deps) -> None:
    headers = key()
    old = (await client.post("/v1/jobs", json=SQUARES, headers=headers)).json()["id"]
    await deps.db.execute(
        "UPDATE jobs SET created_at = now() - interval '25 hours' WHERE id = :id", {"id": uuid.UUID(old)}
    )
    new = await client.post("/v1/jobs", json={**SQUARES, "input": {"data": [9]}}, headers=headers)
    assert new.status_code == 202 and "idempotent-replayed" not in new.headers and new.json()["id"] != old
    assert (await job_row(deps, old))["idempotency_key"] is None  # the old job stays, released from the key
    again = await client.post("/v1/jobs", json={**SQUARES, "input": {"data": [9]}}, headers=headers)
    assert again.json()["id"] == new.json()["id"] and again.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("value", ["", " ", "x" * 256, "café".encode(), "a b"])
async def test_a_malformed_key_is_422_naming_the_header(
    client: httpx.AsyncClient, deps: Deps, value: str | bytes
) -> None:
    response = await client.post("/v1/jobs", json=SQUARES, headers={"Idempotency-Key": value})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == "Idempotency-Key"
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


async def test_ten_thousand_concurrent_submits_with_one_key_make_one_job_run_once(
    client: httpx.AsyncClient, deps: Deps, drain: Drain, capsys: pytest.CaptureFixture[str]
) -> None:
    """50 clients send 10,000 POSTs with one key and body, then 100 with another body."""
    headers = key()
    answers: collections.Counter[tuple[int, str | None, str | None]] = collections.Counter()

    async def one_client(n: int, body: dict[str, object]) -> None:
        for _ in range(n):
            response = await client.post("/v1/jobs", json=body, headers=headers)
            job_id = response.json().get("id") if response.status_code == 202 else None
            answers[response.status_code, response.headers.get("idempotent-replayed"), job_id] += 1

    await asyncio.gather(*(one_client(200, SQUARES) for _ in range(50)))
    await asyncio.gather(*(one_client(2, {**SQUARES, "input": {"data": [7]}}) for _ in range(50)))
    ids = {job_id for (_, _, job_id) in answers if job_id is not None}
    assert len(ids) == 1
    (job_id,) = ids
    assert answers == {(202, None, job_id): 1, (202, "true", job_id): 9_999, (422, None, None): 100}
    with capsys.disabled():
        print("\n10,100 submits with one Idempotency-Key: 1 created, 9,999 replays flagged, 100 x 422, 0 5xx")
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 1
    assert await deps.redis.zcard(QUEUE) == 1  # one dispatch
    await drain()
    row = await job_row(deps, job_id)
    assert row["status"] == "succeeded" and row["attempt"] == 1  # one execution
    runs = await deps.db.fetch_val(
        "SELECT count(*) FROM job_events WHERE job_id = :id AND data->>'status' = 'running'", {"id": row["id"]}
    )
    assert runs == 1
