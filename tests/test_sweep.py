"""The cron pass: re-dispatch what Redis lost, expire late jobs, rescue lost leases, retain; and which of its steps a
pass runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import msgspec

from tests.conftest import job_row
from tests.test_worker import submit
from worker import Deps
from worker.sweep import STEPS, steps_to_run, sweep_once

Drain = Callable[[], Awaitable[None]]


async def test_jobs_queued_when_redis_lost_everything_still_finish(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    ids = [await submit(client, "square_sum", {"data": [i]}) for i in range(5)]
    await deps.redis.flushdb()
    await drain()  # nothing to run: the doorbell is gone
    assert {(await job_row(deps, i))["status"] for i in ids} == {"queued"}
    await deps.db.execute("UPDATE jobs SET dispatched_at = now() - interval '1 minute'")  # as if time passed
    await sweep_once(deps)
    await drain()
    assert [(await client.get(f"/v1/jobs/{i}")).json()["result"] for i in ids] == [i * i for i in range(5)]


async def test_a_recent_dispatch_is_not_rung_twice(client: httpx.AsyncClient, deps: Deps) -> None:
    await submit(client, "square_sum", {"data": [1]})
    before = await deps.db.fetch_val("SELECT dispatched_at FROM jobs")
    await sweep_once(deps)
    assert await deps.db.fetch_val("SELECT dispatched_at FROM jobs") == before


async def test_an_undispatched_job_is_dispatched_by_the_sweep(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [3]})
    await deps.redis.flushdb()
    await deps.db.execute("UPDATE jobs SET dispatched_at = NULL")  # what a submit during a Redis outage leaves
    await sweep_once(deps)
    await drain()
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["result"] == 9


async def test_live_jobs_past_expires_at_end_expired(client: httpx.AsyncClient, deps: Deps) -> None:
    late, fresh = await submit(client, "sleep", {"seconds": 0}), await submit(client, "sleep", {"seconds": 0})
    await deps.db.execute(
        "UPDATE jobs SET expires_at = now() - interval '1 second' WHERE id = CAST(:id AS uuid)", {"id": late}
    )
    await sweep_once(deps)
    job = (await client.get(f"/v1/jobs/{late}")).json()
    assert job["status"] == "expired" and job["done"] and job["error"]["type"] == "expired"
    assert (await client.get(f"/v1/jobs/{fresh}")).json()["status"] == "queued"
    result = await client.get(f"/v1/jobs/{late}/result")
    assert result.status_code == 409 and result.json()["error"]["type"] == "expired"


async def test_an_expired_job_is_never_run(client: httpx.AsyncClient, deps: Deps, drain: Drain) -> None:
    job_id = await submit(client, "square_sum", {"data": [2]})
    await deps.db.execute("UPDATE jobs SET expires_at = now() - interval '1 second'")
    await drain()  # the doorbell rings, but the claim refuses a job past its expires_at
    row = await job_row(deps, job_id)
    assert row["status"] == "queued" and row["attempt"] == 0
    await sweep_once(deps)
    assert (await job_row(deps, job_id))["status"] == "expired"


async def test_a_running_job_whose_lease_ran_out_is_rescued_and_finishes(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [4]})
    await deps.redis.flushdb()
    # A worker claimed attempt 1, then died without a word.
    await deps.db.execute(
        "UPDATE jobs SET status = 'running', attempt = 1, lease_owner = 'dead', started_at = now(),"
        " lease_expires_at = now() - interval '1 second'"
    )
    await sweep_once(deps)
    row = await job_row(deps, job_id)
    assert row["status"] == "queued" and row["attempt"] == 1
    await deps.db.execute("UPDATE jobs SET next_run_at = now()")  # skip the backoff
    await sweep_once(deps)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "succeeded" and job["attempt"] == 2 and job["result"] == 16


async def test_retention_drops_old_results_then_old_jobs(client: httpx.AsyncClient, deps: Deps, drain: Drain) -> None:
    old, older = await submit(client, "square_sum", {"data": [1]}), await submit(client, "square_sum", {"data": [2]})
    await drain()
    await deps.db.execute(
        "UPDATE jobs SET finished_at = now() - interval '8 days' WHERE id = CAST(:id AS uuid)", {"id": old}
    )
    await deps.db.execute(
        "UPDATE jobs SET finished_at = now() - interval '31 days' WHERE id = CAST(:id AS uuid)", {"id": older}
    )
    await sweep_once(deps)
    assert (await client.get(f"/v1/jobs/{old}/result")).status_code == 410
    assert (await client.get(f"/v1/jobs/{older}")).status_code == 404
    assert (
        await deps.db.fetch_val("SELECT count(*) FROM job_events WHERE job_id = CAST(:id AS uuid)", {"id": older}) == 0
    )
    assert msgspec.json.decode((await client.get(f"/v1/jobs/{old}")).content)["status"] == "succeeded"


async def test_a_message_held_by_a_worker_that_died_before_its_claim_is_rung_again(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [5]})
    # arq marks a message in progress (for a day) before run_job claims the row; its worker then died.
    await deps.redis.set(f"arq:in-progress:{job_id}:0", b"1", ex=86_400)
    await deps.db.execute("UPDATE jobs SET dispatched_at = now() - interval '1 minute'")
    await sweep_once(deps)
    assert not await deps.redis.exists(f"arq:in-progress:{job_id}:0")
    await drain()
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["result"] == 25


async def test_a_job_cancelled_while_running_that_went_back_to_queued_ends_cancelled(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [6]})
    await deps.redis.flushdb()
    # Cancel accepted while running; then its worker died and the sweep rescued it back to queued.
    await deps.db.execute(
        "UPDATE jobs SET status = 'running', attempt = 1, started_at = now(), cancel_requested_at = now(),"
        " lease_expires_at = now() - interval '1 second'"
    )
    await sweep_once(deps)
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "cancelled" and job["error"]["type"] == "cancelled" and job["attempt"] == 1


async def test_retention_takes_an_ended_workflow_whole_and_keeps_its_jobs_until_then(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    steps = [
        {"name": "numbers", "type": "count_up", "input": {"n": 3}},
        {"name": "squares", "type": "square_item", "map": "numbers", "input": {"of": "numbers"}},
    ]
    old, recent = [(await client.post("/v1/workflows", json={"steps": steps})).json()["id"] for _ in range(2)]
    await drain()
    # every job of both is past both retentions; only `old` has been over for longer than job retention
    await deps.db.execute("UPDATE jobs SET finished_at = now() - interval '31 days'")
    await deps.db.execute(
        "UPDATE workflows SET finished_at = now() - interval '31 days' WHERE id = CAST(:id AS uuid)", {"id": old}
    )
    await sweep_once(deps)
    assert (await client.get(f"/v1/workflows/{old}")).status_code == 404
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs WHERE workflow_id = CAST(:id AS uuid)", {"id": old}) == 0
    assert (
        await deps.db.fetch_val(
            "SELECT count(*) FROM workflow_events WHERE workflow_id = CAST(:id AS uuid)", {"id": old}
        )
        == 0
    )
    kept = (await client.get(f"/v1/workflows/{recent}")).json()
    assert kept["status"] == "succeeded" and len(kept["steps"]["squares"]["job_ids"]) == 3  # its jobs stay with it
    [first] = kept["steps"]["numbers"]["job_ids"]
    assert (await client.get(f"/v1/jobs/{first}/result")).json() == [0, 1, 2]  # and their results


async def test_a_pass_with_nothing_live_runs_none_of_its_steps(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    await submit(client, "square_sum", {"data": [1]})
    await drain()  # ended: no step has anything to do with it
    assert await steps_to_run(deps.db) == frozenset()


async def test_a_pass_runs_from_the_first_step_with_work_on(client: httpx.AsyncClient, deps: Deps) -> None:
    job_id = await submit(client, "square_sum", {"data": [1]})  # queued and due: the dispatch's, and what follows
    assert await steps_to_run(deps.db) == frozenset(("dispatch", "resume"))
    await deps.db.execute(
        "UPDATE jobs SET status = 'running', attempt = 1, lease_expires_at = now() - interval '1 second'"
        " WHERE id = CAST(:id AS uuid)",
        {"id": job_id},
    )
    assert await steps_to_run(deps.db) == frozenset(STEPS)  # a rescue may make any later step's work
