"""POST /v1/jobs/{id}/cancel, and what a worker's shutdown does to the attempts it is running."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import msgspec
import pytest
from arq.worker import Worker

from tests import engine
from tests.conftest import eventually, job_row, run_burst
from tests.test_worker import submit
from worker import Config, Deps, claim, heartbeat, run, store
from worker.job_types import load
from worker.queue import message

Drain = Callable[[], Awaitable[None]]


async def running(deps: Deps, job_id: str) -> None:
    async def check() -> bool | None:
        return (await job_row(deps, job_id))["status"] == "running" or None

    await eventually(check)


async def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_runs(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [1]})
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled" and response.json()["done"]
    await drain()
    row = await job_row(deps, job_id)
    assert row["status"] == "cancelled" and row["attempt"] == 0 and row["result"] is None
    result = await client.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 409 and result.json()["error"]["type"] == "cancelled"


async def test_cancelling_a_running_job_interrupts_its_task(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1})
    worker = asyncio.create_task(drain())
    await running(deps, job_id)
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "running"
    await asyncio.wait_for(worker, 15)  # the 600 s job stopped
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "cancelled" and job["error"]["type"] == "cancelled"


async def test_a_running_job_sees_a_cancel_at_its_heartbeat_without_arq_abort(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1})
    worker = asyncio.create_task(drain())
    await running(deps, job_id)
    assert await store.request_cancel(deps.jobs, "default", uuid.UUID(job_id)) is not None  # no abort message sent
    await asyncio.wait_for(worker, 15)
    assert (await job_row(deps, job_id))["status"] == "cancelled"


async def test_cancelling_a_done_job_is_409_and_changes_nothing(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [2]})
    await drain()
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409 and response.json()["type"] == "/problems/conflict"
    row = await job_row(deps, job_id)
    assert row["status"] == "succeeded" and row["cancel_requested_at"] is None


async def test_cancelling_an_unknown_or_malformed_id_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.post(f"/v1/jobs/{uuid.uuid4()}/cancel")).status_code == 404
    assert (await client.post("/v1/jobs/nope/cancel")).status_code == 404


async def shut_down_while_running(deps: Deps, make_worker: Callable[[], Worker], job_id: str) -> None:
    worker = make_worker()
    worker.max_burst_jobs = 1  # stop picking after this job, as a worker does once it has a SIGTERM
    main = asyncio.create_task(run_burst(worker))
    await running(deps, job_id)
    for task in list(worker.tasks.values()):
        task.cancel()  # what arq does to the running jobs once the shutdown grace is over
    await asyncio.wait_for(main, 15)


async def test_shutdown_hands_a_retry_safe_attempt_back_without_counting_it(
    client: httpx.AsyncClient, deps: Deps, make_worker: Callable[[], Worker]
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1}, max_attempts=1)
    await shut_down_while_running(deps, make_worker, job_id)
    row = await job_row(deps, job_id)
    assert row["status"] == "queued" and row["attempt"] == 1 and row["interrupted"] == 1
    # max_attempts=1, yet it may run again: the interrupted attempt did not count.
    claimed = await engine.claim_one(deps.jobs, uuid.UUID(job_id), 1, owner="next", lease_s=30)
    assert claimed is not None and claimed.attempts_left is False and claimed.attempt == 2


async def test_shutdown_fails_a_job_that_is_not_retry_safe_as_interrupted(
    client: httpx.AsyncClient, deps: Deps, make_worker: Callable[[], Worker]
) -> None:
    job_id = await submit(client, "sleep_once", {"seconds": 600})
    await shut_down_while_running(deps, make_worker, job_id)
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "interrupted"


# -- an abort or a shutdown that lands while the claim is in flight ----------------------------------


def job_ctx(config: Config, deps: Deps) -> dict[str, object]:
    return {"deps": deps, "runtime": run.Runtime.of(deps, load(config.job_modules))}


@pytest.fixture
def claim_commits_then_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The narrowest window there is: the claim's UPDATE commits, and the cancellation reaches the task before the
    answer does. No timing can aim at it from outside, so the claim is made to end exactly there."""
    claim_many = claim.claim_many

    async def committed_then_cancelled(*args: object, **kwargs: object) -> list[claim.Claimed | None]:
        await claim_many(*args, **kwargs)  # type: ignore[arg-type]
        raise asyncio.CancelledError

    monkeypatch.setattr(claim, "claim_many", committed_then_cancelled)


@pytest.mark.usefixtures("claim_commits_then_cancelled")
async def test_a_claim_that_committed_as_its_task_was_cancelled_is_handed_back_at_once(
    client: httpx.AsyncClient, config: Config, deps: Deps
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1}, max_attempts=1)
    with pytest.raises(asyncio.CancelledError):
        await run.run_job(job_ctx(config, deps), message(uuid.UUID(job_id), 0))
    row = await job_row(deps, job_id)  # not running with no task until the lease ends: handed back, uncounted
    assert row["status"] == "queued" and row["attempt"] == 1 and row["interrupted"] == 1


@pytest.mark.usefixtures("claim_commits_then_cancelled")
async def test_a_claim_that_committed_as_its_cancel_arrived_ends_cancelled_at_once(
    client: httpx.AsyncClient, config: Config, deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1})
    claim_many = claim.claim_many

    async def then_cancel_requested(*args: object, **kwargs: object) -> list[claim.Claimed | None]:
        try:
            return await claim_many(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            await store.request_cancel(deps.jobs, "default", uuid.UUID(job_id))  # what POST /cancel does

    monkeypatch.setattr(claim, "claim_many", then_cancel_requested)
    with pytest.raises(asyncio.CancelledError):
        await run.run_job(job_ctx(config, deps), message(uuid.UUID(job_id), 0))
    row = await job_row(deps, job_id)
    assert row["status"] == "cancelled" and msgspec.json.decode(row["error"])["type"] == "cancelled"


async def test_a_claim_that_committed_but_whose_answer_was_lost_is_handed_back_at_once_whatever_its_type(
    client: httpx.AsyncClient, config: Config, deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None of its code ran, so even a type that is not retry-safe goes back: not `running` with no task until its
    lease ends, then failed as `worker_lost`."""
    claim_many = claim.claim_many

    async def committed_then_lost(*args: object, **kwargs: object) -> list[claim.Claimed | None]:
        await claim_many(*args, **kwargs)  # type: ignore[arg-type]
        raise OSError("connection reset by peer")

    monkeypatch.setattr(claim, "claim_many", committed_then_lost)
    job_id = await submit(client, "sleep_once", {"seconds": 600})  # retry_safe=False
    await run.run_job(job_ctx(config, deps), message(uuid.UUID(job_id), 0))
    row = await job_row(deps, job_id)
    assert row["status"] == "queued" and row["attempt"] == 1 and row["interrupted"] == 1


async def test_a_claim_cancelled_while_it_waits_for_the_row_leaves_the_job_queued_for_the_next(
    client: httpx.AsyncClient, config: Config, deps: Deps
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1})
    blocker = await asyncpg.connect(config.database_url)
    try:
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", uuid.UUID(job_id))
        task = asyncio.create_task(run.run_job(job_ctx(config, deps), message(uuid.UUID(job_id), 0)))

        async def claim_waits_on_the_lock() -> bool | None:
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return waiting == 1 or None

        await eventually(claim_waits_on_the_lock)
        task.cancel()
        await asyncio.wait([task])
        await locked.rollback()
    finally:
        await blocker.close()
    row = await job_row(deps, job_id)
    assert row["status"] == "queued" and row["attempt"] == 0 and row["lease_owner"] is None
    assert await engine.claim_one(deps.jobs, uuid.UUID(job_id), 0, owner="next", lease_s=30) is not None


async def test_an_attempt_that_cannot_renew_its_lease_stops_before_the_lease_runs_out(
    client: httpx.AsyncClient, config: Config, deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This worker loses the database (a partition: others may still reach it and rescue the job once the lease is
    over), so its attempt must be gone by then, not run beside the next one until it finishes."""
    lease_s = 3.0
    job_id = await submit(client, "sleep", {"seconds": 600, "steps": 1})
    short = dataclasses.replace(deps, config=msgspec.structs.replace(config, lease_s=lease_s))

    async def unreachable(*args: object, **kwargs: object) -> dict[uuid.UUID, heartbeat.Verdict]:
        raise OSError("connection refused")

    monkeypatch.setattr(heartbeat, "beat_many", unreachable)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(run.run_job(job_ctx(config, short), message(uuid.UUID(job_id), 0)), lease_s + 10)
    took = asyncio.get_running_loop().time() - started
    row = await job_row(deps, job_id)
    assert took < lease_s, took  # stopped while the lease still held
    assert row["status"] == "running" and row["attempt"] == 1  # it wrote nothing: the sweep decides, as for a crash


async def test_an_attempts_last_write_runs_to_its_end_however_often_its_task_is_cancelled_meanwhile() -> None:
    """The heartbeat's cancel verdict and arq's abort of the same cancel can land one after the other: no cancel of
    the task may end it before the attempt's last write has ended, or a burst worker (or a shutdown) closes the loop
    under the write and the row stays `running` until its lease runs out. The cancel comes through after it."""
    release, wrote = asyncio.Event(), []

    async def write() -> None:
        await release.wait()
        wrote.append("cancelled")

    task = asyncio.create_task(run._to_the_end(write()))
    for _ in range(3):  # the verdict, arq's abort, the shutdown
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done(), "a cancel ended the task before its write"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wrote == ["cancelled"]
