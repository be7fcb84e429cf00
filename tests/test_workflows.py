"""Workflows (POST /v1/workflows): steps that wait on steps, maps and fan-ins, failure and cancel, and the checks made
before anything is written. The job types are tests/jobs.py's `count_up`, `square_item` and `upstream`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import httpx
import msgspec
import pytest

import tests.jobs
from tests.conftest import job_row
from tests.sse import RawStream, live_server
from worker import Config, Deps
from worker.sweep import sweep_once

Drain = Callable[[], Awaitable[None]]


async def submit(client: httpx.AsyncClient, *steps: dict[str, Any]) -> dict[str, Any]:
    answer = await client.post("/v1/workflows", json={"steps": list(steps)})
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/v1/workflows/{answer.json()['id']}"
    workflow: dict[str, Any] = answer.json()
    return workflow


async def shown(client: httpx.AsyncClient, workflow: dict[str, Any]) -> dict[str, Any]:
    answer = await client.get(f"/v1/workflows/{workflow['id']}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


async def results(client: httpx.AsyncClient, job_ids: list[str]) -> list[Any]:
    return [(await client.get(f"/v1/jobs/{job_id}")).json()["result"] for job_id in job_ids]


async def count(deps: Deps, table: str) -> int:
    return int(await deps.db.fetch_val(f"SELECT count(*) FROM {table}"))


async def test_a_step_starts_only_after_the_steps_it_waits_on_and_gets_their_results(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 3}},
        {"name": "sum", "type": "square_sum", "input": {"data": [1, 2]}},
        {"name": "both", "type": "upstream", "after": ["numbers", "sum"]},
    )
    assert workflow["status"] == "running" and not workflow["done"]
    assert workflow["steps"]["both"] == {"status": "waiting", "job_ids": [], "counts": {}}
    assert [workflow["steps"][s]["status"] for s in ("numbers", "sum")] == ["running", "running"]
    await drain()
    done = await shown(client, workflow)
    assert done["status"] == "succeeded" and done["done"] and done["finished_at"] is not None
    assert {name: step["status"] for name, step in done["steps"].items()} == dict.fromkeys(done["steps"], "succeeded")
    [last] = done["steps"]["both"]["job_ids"]
    assert await results(client, [last]) == [{"numbers": [0, 1, 2], "sum": 5}]
    last_row = await job_row(deps, last)
    for before in ("numbers", "sum"):
        row = await job_row(deps, done["steps"][before]["job_ids"][0])
        assert row["finished_at"] <= last_row["created_at"]  # made once they had ended, not merely started
    job = (await client.get(f"/v1/jobs/{last}")).json()
    assert job["workflow_id"] == workflow["id"] and job["step"] == "both"


async def test_a_map_makes_one_job_per_item_and_its_fan_in_runs_once_with_every_result_in_order(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 30}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}},
        {"name": "all", "type": "upstream", "after": ["squares"]},
    )
    await drain()
    done = await shown(client, workflow)
    assert done["status"] == "succeeded", done
    squares = done["steps"]["squares"]["job_ids"]
    assert len(squares) == 30 and await results(client, squares) == [n * n for n in range(30)]
    assert done["steps"]["squares"]["counts"] == {"succeeded": 30}
    [fan_in] = done["steps"]["all"]["job_ids"]
    assert await results(client, [fan_in]) == [{"squares": [n * n for n in range(30)]}]
    assert await count(deps, "jobs") == 32


async def test_a_map_over_an_empty_list_is_over_at_once_and_what_follows_it_runs(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 0}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}},
        {"name": "all", "type": "upstream", "after": ["squares"]},
    )
    await drain()
    done = await shown(client, workflow)
    assert done["status"] == "succeeded"
    assert done["steps"]["squares"] == {"status": "succeeded", "job_ids": [], "counts": {}}
    assert await results(client, done["steps"]["all"]["job_ids"]) == [{"squares": []}]


async def test_a_map_over_a_result_that_is_not_a_list_fails_the_workflow_naming_the_step(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "sum", "type": "square_sum", "input": {"data": [3]}},
        {"name": "squares", "type": "square_item", "map": "sum", "input": {"of": "sum"}},
    )
    await drain()
    done = await shown(client, workflow)
    assert done["status"] == "failed" and done["steps"]["squares"]["status"] == "failed"
    assert done["error"]["step"] == "squares" and "not a list" in done["error"]["message"]


async def test_a_step_that_fails_for_good_fails_the_workflow_and_nothing_starts_after_it(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 60}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers", "bad": 0}},
        {"name": "all", "type": "upstream", "after": ["squares"]},
    )
    await drain()  # the worker that ended the failed job also ends the queued jobs it marked: no sweep needed
    done = await shown(client, workflow)
    assert done["status"] == "failed" and done["finished_at"] is not None
    assert done["steps"]["squares"]["status"] == "failed" and done["steps"]["all"] == {
        "status": "cancelled",
        "job_ids": [],
        "counts": {},
    }
    assert done["error"]["step"] == "squares" and done["error"]["error"]["type"] == "bad_item"
    rows = [await job_row(deps, job_id) for job_id in done["steps"]["squares"]["job_ids"]]
    assert {row["status"] for row in rows} <= {"succeeded", "failed", "cancelled"}
    failed_at = next(row["finished_at"] for row in rows if row["status"] == "failed")
    started = [row["started_at"] for row in rows if row["started_at"] is not None]
    assert all(at <= failed_at for at in started)  # what had not started when it failed never did
    assert sum(row["status"] == "cancelled" for row in rows) == len(rows) - len(started)


async def test_retrying_the_failed_step_resumes_the_workflow_from_there(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 40}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers", "bad": 7}},
        {"name": "all", "type": "upstream", "after": ["squares"]},
    )
    await drain()
    failed = await shown(client, workflow)
    assert failed["status"] == "failed" and failed["error"]["step"] == "squares"
    first = set(failed["steps"]["squares"]["job_ids"])
    failed_job = failed["error"]["job_id"]
    ended = await stream_of(client, workflow)  # a failed workflow's stream: its steps' last changes, then its end
    assert ended[-1] == ("workflow", "failed") and ("step", "squares", "failed") in ended[:-1]
    tests.jobs.REPAIRED.add(7)  # the fix is out: the failed item succeeds from now on
    try:
        answer = await client.post(f"/v1/jobs/{failed_job}/retry", headers={"Idempotency-Key": "resume-1"})
        assert answer.status_code == 202, answer.text
        replayed = await client.post(f"/v1/jobs/{failed_job}/retry", headers={"Idempotency-Key": "resume-1"})
        assert replayed.status_code == 202 and replayed.headers["idempotent-replayed"] == "true"
        assert replayed.json()["id"] == answer.json()["id"]  # the answer was lost: the same job, not a 409
        retried = answer.json()
        assert retried["retry_of"] == failed_job and retried["workflow_id"] == workflow["id"]
        assert retried["step"] == "squares" and retried["status"] == "queued"
        resumed = await shown(client, workflow)
        assert resumed["status"] == "running" and resumed["error"] is None and resumed["finished_at"] is None
        assert resumed["steps"]["squares"]["status"] == "running" and resumed["steps"]["all"]["status"] == "waiting"
        again = await client.post(f"/v1/jobs/{failed_job}/retry")  # its workflow runs: nothing to resume
        assert again.status_code == 409 and "is running" in again.json()["detail"], again.text
        await drain()
    finally:
        tests.jobs.REPAIRED.discard(7)
    done = await shown(client, workflow)
    assert done["status"] == "succeeded", done
    # what succeeded before ran once; what failed or was cancelled was made again, naming the job it replaces
    rows = [await job_row(deps, job_id) for job_id in done["steps"]["squares"]["job_ids"]]
    remade = [row for row in rows if row["id"] not in {UUID(j) for j in first}]
    assert {str(row["retry_of"]) for row in remade} == {
        str(row["id"]) for row in rows if str(row["id"]) in first and row["status"] != "succeeded"
    }
    assert all(row["status"] == "succeeded" for row in remade)
    [all_job] = done["steps"]["all"]["job_ids"]
    assert await results(client, [all_job]) == [{"squares": [n * n for n in range(40)]}]  # in item order, once each
    twice = await client.post(f"/v1/jobs/{failed_job}/retry")
    assert twice.status_code == 409 and "succeeded" in twice.json()["detail"], twice.text
    # the whole stream from the start: it goes on past the old failure, to the end the resume reached
    whole = await stream_of(client, workflow)
    assert whole[-1] == ("workflow", "succeeded") and ("workflow", "failed") in whole[:-1]


async def stream_of(client: httpx.AsyncClient, workflow: dict[str, Any]) -> list[tuple[str, ...]]:
    """An ended workflow's stream, replayed whole: (event, step, status) for steps, (event, status) for the rest."""
    answer = await client.get(f"/v1/workflows/{workflow['id']}/events")
    assert answer.status_code == 200, answer.text
    frames = []
    for block in answer.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        data = msgspec.json.decode(fields["data"])
        frames.append(
            (fields["event"], data["step"], data["status"]) if "step" in data else (fields["event"], data["status"])
        )
    return frames


async def test_cancel_ends_the_workflow_and_its_jobs_and_nothing_of_it_runs_afterwards(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 5}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}},
    )
    answer = await client.post(f"/v1/workflows/{workflow['id']}/cancel")
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "cancelled" and answer.json()["error"]["type"] == "cancelled"
    assert answer.json()["steps"]["squares"]["status"] == "cancelled"
    await drain()
    [first] = answer.json()["steps"]["numbers"]["job_ids"]
    assert (await job_row(deps, first))["status"] == "cancelled"
    assert await count(deps, "jobs") == 1  # the map never started
    again = await client.post(f"/v1/workflows/{workflow['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


async def test_a_step_its_worker_never_started_is_started_by_the_sweep(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    """As if the worker that ended the step's last job died before it made the next step's jobs: the trigger made
    the step ready in the same commit as the end, and the sweep's pass starts it."""
    workflow = await submit(
        client,
        {"name": "numbers", "type": "count_up", "input": {"n": 2}},
        {"name": "all", "type": "upstream", "after": ["numbers"]},
    )
    [first] = workflow["steps"]["numbers"]["job_ids"]
    await deps.db.execute(
        "UPDATE jobs SET status = 'succeeded', result = '[7, 8]', finished_at = now() WHERE id = :id",
        {"id": UUID(first)},
    )
    assert (await shown(client, workflow))["steps"]["all"] == {"status": "ready", "job_ids": [], "counts": {}}
    await deps.redis.flushdb()  # nothing left for a worker to find but what the sweep rings
    await sweep_once(deps)
    await drain()
    done = await shown(client, workflow)
    assert done["status"] == "succeeded"
    assert await results(client, done["steps"]["all"]["job_ids"]) == [{"numbers": [7, 8]}]


@pytest.mark.parametrize(
    ("steps", "loc"),
    [
        ([{"name": "a", "type": "count_up", "input": {"n": 1}, "after": ["b"]}], "$.steps[0].after[0]"),
        ([{"name": "a", "type": "count_up", "input": {"n": 1}, "map": "nope"}], "$.steps[0].map"),
        ([{"name": "a", "type": "count_up", "input": {"n": 1}, "after": ["a"]}], "$.steps[0].after[0]"),
        (
            [
                {"name": "a", "type": "count_up", "input": {"n": 1}},
                {"name": "a", "type": "count_up", "input": {"n": 1}},
            ],
            "$.steps[1].name",
        ),
        (
            [
                {"name": "a", "type": "count_up", "input": {"n": 1}, "after": ["c"]},
                {"name": "b", "type": "count_up", "input": {"n": 1}, "after": ["a"]},
                {"name": "c", "type": "count_up", "input": {"n": 1}, "map": "b"},
            ],
            "$.steps[0].after",
        ),
        ([{"name": "a", "type": "nope"}], "$.steps[0].type"),
        ([{"name": "a", "type": "square_sum", "input": {"data": ["x"]}}], "$.steps[0].input.data[0]"),
        ([{"name": "a b", "type": "count_up", "input": {"n": 1}}], "$.steps[0].name"),
        ([{"name": "a", "type": "count_up", "input": {"n": 1}, "callback": "x"}], "$.steps[0]"),
        ([], "$.steps"),
    ],
)
async def test_a_bad_workflow_is_422_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, deps: Deps, steps: list[dict[str, Any]], loc: str
) -> None:
    answer = await client.post("/v1/workflows", json={"steps": steps})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["errors"][0]["loc"] == loc, answer.json()
    assert await count(deps, "workflows") == 0 and await count(deps, "jobs") == 0


async def test_another_tenants_workflow_is_not_found(
    client: httpx.AsyncClient, config: Any, deps: Deps, drain: Drain
) -> None:
    from tests.conftest import open_app
    from worker import keys

    workflow = await submit(client, {"name": "numbers", "type": "count_up", "input": {"n": 1}})
    await deps.db.execute("INSERT INTO tenants (id) VALUES ('other')")
    other_key = await keys.create(deps.db, "other", "tests")
    async with open_app(config, other_key) as other:
        assert (await other.get(f"/v1/workflows/{workflow['id']}")).status_code == 404
        assert (await other.post(f"/v1/workflows/{workflow['id']}/cancel")).status_code == 404
        assert (await other.get("/v1/workflows/not-an-id")).status_code == 404
    assert (await shown(client, workflow))["status"] == "running"


async def test_an_idempotency_key_makes_one_workflow_however_often_it_is_sent(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    body = {"steps": [{"name": "numbers", "type": "count_up", "input": {"n": 2}}]}
    first = await client.post("/v1/workflows", json=body, headers={"Idempotency-Key": "wf-1"})
    again = await client.post("/v1/workflows", json=body, headers={"Idempotency-Key": "wf-1"})
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"]
    assert await count(deps, "workflows") == 1 and await count(deps, "jobs") == 1
    other = {"steps": [{"name": "numbers", "type": "count_up", "input": {"n": 3}}]}
    reused = await client.post("/v1/workflows", json=other, headers={"Idempotency-Key": "wf-1"})
    assert reused.status_code == 422 and reused.json()["type"] == "/problems/idempotency-key-reused"
    assert await count(deps, "workflows") == 1


async def test_the_built_in_demo_sums_the_squares_of_a_list_through_a_map_and_a_fan_in(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    workflow = await submit(
        client,
        {"name": "chunks", "type": "split", "input": {"data": list(range(1, 101)), "size": 7}},
        {"name": "sums", "type": "chunk_sum", "map": "chunks", "input": {"of": "chunks"}},
        {"name": "total", "type": "total", "after": ["sums"], "input": {"of": "sums"}},
    )
    await drain()
    done = await shown(client, workflow)
    assert done["status"] == "succeeded" and len(done["steps"]["sums"]["job_ids"]) == 15  # 100 in chunks of 7
    assert await results(client, done["steps"]["total"]["job_ids"]) == [sum(n * n for n in range(1, 101))]
    misplaced = await submit(client, {"name": "total", "type": "total", "input": {"of": "nothing"}})
    await drain()
    failed = await shown(client, misplaced)
    assert failed["status"] == "failed" and "not a list of integers" in failed["error"]["error"]["message"]


async def test_a_workflows_event_stream_follows_every_step_live_and_resumes_from_last_event_id(
    config: Config, deps: Deps, drain: Drain
) -> None:
    async with live_server(config) as live, live.client() as http:
        answer = await http.post(
            "/v1/workflows",
            json={
                "steps": [
                    {"name": "numbers", "type": "count_up", "input": {"n": 4}},
                    {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}},
                    {"name": "all", "type": "upstream", "after": ["squares"]},
                ]
            },
        )
        assert answer.status_code == 202, answer.text
        workflow_id = answer.json()["id"]
        path = f"/v1/workflows/{workflow_id}/events"
        stream = await RawStream.open(live.url, "", key=live.key, path=path)
        first = await stream.next_frame()  # the stream is open and replaying before anything runs
        assert first is not None and (first.event, first.data["status"]) == ("workflow", "running")
        await drain()
        frames = [first, *await stream.rest()]  # it ends by itself after the workflow's last event
        assert [f.id for f in frames] == list(range(1, len(frames) + 1))
        assert (frames[-1].event, frames[-1].data["status"]) == ("workflow", "succeeded")
        assert frames[-1].data["finished_at"] is not None
        by_step: dict[str, list[str]] = {}
        for f in frames:
            if f.event == "step":
                by_step.setdefault(f.data["step"], []).append(f.data["status"])
        assert by_step == {
            "numbers": ["ready", "running", "succeeded"],
            "squares": ["waiting", "ready", "running", "succeeded"],
            "all": ["waiting", "ready", "running", "succeeded"],
        }
        replay = await RawStream.open(live.url, "", key=live.key, path=path, last_event_id=3)
        assert [(f.id, f.event, f.data) for f in await replay.rest()] == [(f.id, f.event, f.data) for f in frames[3:]]
        over = await http.get(path, headers={"Last-Event-ID": str(frames[-1].id)})
        assert over.status_code == 204  # nothing follows: EventSource stops
        assert (await http.get(f"/v1/workflows/{UUID(int=7)}/events")).status_code == 404
        bad = await http.get(path, headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == "Last-Event-ID"
