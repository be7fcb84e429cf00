"""Children that a job's code spawns (ctx.spawn, worker/spawn.py) and a parent that waits for them as a row: one
child per key however often the parent runs, no slot held while waiting, the outcomes handed back, and a parent's
end taking its live children with it. The job type is tests/jobs.py's `fan_out`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import httpx
import msgspec
from uuid_utils.compat import uuid7

from tests.conftest import eventually, job_row
from worker import Deps, control, spawn, store
from worker.sweep import sweep_once

Drain = Callable[[], Awaitable[None]]


async def submit(client: httpx.AsyncClient, **input: Any) -> dict[str, Any]:
    answer = await client.post("/v1/jobs", json={"type": "fan_out", "input": input})
    assert answer.status_code == 202, answer.text
    job: dict[str, Any] = answer.json()
    return job


async def job(client: httpx.AsyncClient, job_id: str | UUID) -> dict[str, Any]:
    answer = await client.get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


async def children_of(deps: Deps, parent: str) -> list[dict[str, Any]]:
    rows = await deps.db.fetch_all("SELECT * FROM jobs WHERE parent_id = :id ORDER BY id", {"id": UUID(parent)})
    return [dict(r._mapping) for r in rows]


async def statuses(deps: Deps, parent: str) -> list[str]:
    """The status events of the parent, in order."""
    rows = await deps.db.fetch_all(
        "SELECT data->>'status' AS status FROM job_events WHERE job_id = :id AND name = 'status' ORDER BY seq",
        {"id": UUID(parent)},
    )
    return [r["status"] for r in rows]


async def test_a_parent_waits_for_its_children_and_runs_again_with_their_results(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    parent = await submit(client, n=5)
    await drain()
    done = await job(client, parent["id"])
    assert done["status"] == "succeeded", done
    assert done["result"] == {f"part-{i}": {"status": "succeeded", "result": i * i} for i in range(5)}
    kids = await children_of(deps, parent["id"])
    assert [k["spawn_key"] for k in kids] == [f"part-{i}" for i in range(5)]
    assert {k["tenant_id"] for k in kids} == {"default"} and all(k["status"] == "succeeded" for k in kids)
    shown = await job(client, kids[0]["id"])
    assert shown["parent_id"] == parent["id"]
    row = await job_row(deps, parent["id"])
    # two runs, the second once every child had ended; the wait counted as no attempt
    assert row["waits"] == 1 and row["attempt"] == 2 and row["interrupted"] == 1
    assert all(k["finished_at"] <= row["finished_at"] for k in kids)
    assert await statuses(deps, parent["id"]) == ["queued", "running", "queued", "running", "succeeded"]
    # and its event stream shows them: the wait's `queued` has no next_run_at to show (it is due never)
    replay = await client.get(f"/v1/jobs/{parent['id']}/events")
    assert replay.status_code == 200, replay.text
    shown = [msgspec.json.decode(line[6:]) for line in replay.text.splitlines() if line.startswith("data: {")]
    status_jobs = [event for event in shown if "status" in event and "id" in event]
    assert [e["status"] for e in status_jobs] == ["queued", "running", "queued", "running", "succeeded"]
    assert "retry" not in status_jobs[2] and status_jobs[-1]["result"] == done["result"]


async def test_a_waiting_parent_holds_no_slot_so_its_children_run_under_a_cap_of_one(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    # A parent that slept while holding its tenant's only slot would leave its children queued for ever.
    await deps.db.execute("UPDATE tenants SET max_running = 1 WHERE id = 'default'")
    parent = await submit(client, n=3)
    await drain()
    done = await job(client, parent["id"])
    assert done["status"] == "succeeded", done
    assert [v["result"] for v in done["result"].values()] == [0, 1, 4]
    assert await deps.db.fetch_val("SELECT running FROM tenants WHERE id = 'default'") == 0


async def test_a_parent_retried_after_spawning_gets_the_same_children_not_new_ones(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    parent = await submit(client, n=4, fail_first_attempt=True)
    await drain()
    done = await job(client, parent["id"])
    assert done["status"] == "succeeded", done
    kids = await children_of(deps, parent["id"])
    assert len(kids) == 4 and len(done["result"]) == 4
    assert all(k["attempt"] == 1 for k in kids)  # each ran once, though two attempts of the parent spawned it
    row = await job_row(deps, parent["id"])
    assert row["attempt"] == 3 and row["waits"] == 1  # the failed attempt, the one that waited, the resumed run


async def test_children_that_fail_are_handed_back_as_failed_and_the_parent_decides(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    parent = await submit(client, n=2, child_type="explode", child_input={})
    await drain()
    done = await job(client, parent["id"])
    assert done["status"] == "succeeded", done  # fan_out reports its children whatever became of them
    assert {v["status"] for v in done["result"].values()} == {"failed"}


async def test_a_spawn_the_type_refuses_fails_the_parent_with_a_clear_error(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    unknown = await submit(client, n=1, child_type="no_such_type")
    bad_input = await submit(client, n=1, child_input={"data": "not a list"})
    await drain()
    for parent, words in ((unknown, "unknown job type 'no_such_type'"), (bad_input, "fails its schema")):
        done = await job(client, parent["id"])
        assert done["status"] == "failed" and done["error"]["type"] == "invalid_spawn", done
        assert words in done["error"]["message"]
        assert done["attempt"] == 1  # no later attempt would do better
    assert await children_of(deps, bad_input["id"]) == []


async def test_cancelling_a_waiting_parent_stops_its_running_children(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    parent = await submit(client, n=3, child_type="sleep_once", child_input={"seconds": 600})
    worker = asyncio.create_task(drain())

    async def all_running() -> list[dict[str, Any]] | None:
        kids = await children_of(deps, parent["id"])
        return kids if len(kids) == 3 and {k["status"] for k in kids} == {"running"} else None

    await eventually(all_running)
    assert (await job_row(deps, parent["id"]))["waiting"]
    cancelled = await control.cancel(deps, "default", UUID(parent["id"]))
    assert cancelled is not None and cancelled.status == "cancelled"  # queued while it waits: ended at once
    await sweep_once(deps)  # the cascade: the children are asked to stop, and their worker is told
    await asyncio.wait_for(worker, 30)  # the burst worker returns once nothing runs: the children stopped
    kids = await children_of(deps, parent["id"])
    assert {k["status"] for k in kids} == {"cancelled"}, [k["status"] for k in kids]
    assert (await job(client, parent["id"]))["status"] == "cancelled"


def new_job(type: str, **fields: Any) -> store.NewJob:
    return store.NewJob(
        id=uuid7(),
        tenant="default",
        type=type,
        input=b"{}",
        max_attempts=1,
        timeout_s=10,
        retry_safe=True,
        callback_url=None,
        metadata=b"{}",
        ttl_s=3600,
        **fields,
    )


async def test_resume_wakes_only_a_parent_whose_every_child_ended(deps: Deps) -> None:
    # resume's own guard, alone: with one child live the parent stays waiting, and it is woken once
    parent, child = new_job("fan_out"), new_job("sleep_once")
    await store.insert_jobs(deps.db, [parent])
    await store.insert_jobs(deps.db, [msgspec.structs.replace(child, parent_id=parent.id, spawn_key="k")])
    await deps.db.execute(
        "UPDATE jobs SET waiting = true, next_run_at = 'infinity', dispatched_at = NULL WHERE id = :id",
        {"id": parent.id},
    )
    assert await spawn.resume(deps.db, [parent.id], batch=10) == []
    assert await store.request_cancel(deps.jobs, "default", child.id) is not None  # queued: it ends at once
    [bell] = await spawn.resume(deps.db, None, batch=10)
    assert bell.job_id == parent.id
    assert await spawn.resume(deps.db, None, batch=10) == []
    row = await job_row(deps, parent.id)
    assert not row["waiting"] and row["dispatched_at"] is not None


async def test_the_built_in_spawn_sum_demo_adds_up_the_chunks_its_children_summed(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    answer = await client.post(
        "/v1/jobs", json={"type": "spawn_sum", "input": {"data": list(range(1, 101)), "size": 7}}
    )
    assert answer.status_code == 202, answer.text
    await drain()
    done = await job(client, answer.json()["id"])
    assert done["status"] == "succeeded" and done["result"] == sum(n * n for n in range(1, 101)), done
    kids = await children_of(deps, answer.json()["id"])
    assert len(kids) == 15 and {k["type"] for k in kids} == {"square_sum"}  # 100 in chunks of 7
