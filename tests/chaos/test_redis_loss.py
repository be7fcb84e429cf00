"""Redis loses everything (FLUSHALL, or kill -9 and a fresh empty server on the same port) with 50 jobs queued
and 10 running: the rows are the truth, so all 60 finish, and the running ones are not run a second time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from uuid import UUID

import pytest

from tests.chaos.conftest import Cluster, lifecycle_problems
from tests.conftest import eventually
from worker.connections import QUEUE
from worker.queue import message

pytestmark = pytest.mark.slow

RUNNING, QUEUED = 10, 50


@pytest.mark.parametrize("loss", ["flushall", "kill_9_and_fresh_server"])
async def test_redis_losing_everything_loses_no_job_and_reruns_no_running_one(
    cluster: Cluster, figure: Callable[[str], None], loss: str
) -> None:
    cluster.start_web()
    # Ten slots: the busy worker runs the ten long jobs and cannot take any of the fifty that follow.
    busy = cluster.start_worker("busy", OUTLAST_WORKER_MAX_JOBS=str(RUNNING))
    await cluster.web_ready()
    await cluster.worker_ready("busy")

    running = [await cluster.submit("chaos_sleep", {"seconds": 6}) for _ in range(RUNNING)]

    async def all_running() -> bool | None:
        rows = await cluster.rows(running)
        return all(r["status"] == "running" for r in rows.values()) or None

    await eventually(all_running)
    queued = [await cluster.submit("chaos_sleep", {"seconds": 0.2}) for _ in range(QUEUED)]
    assert await cluster.statuses() == {"running": RUNNING, "queued": QUEUED}
    doorbells = [message(UUID(job_id), 0) for job_id in queued]  # each queued job's arq message: "{id}:{attempt}"
    assert None not in await cluster.redis.zmscore(QUEUE, doorbells)

    lost_at = time.time()
    if loss == "flushall":
        await cluster.redis.flushall()
    else:
        await asyncio.to_thread(cluster.stores.wipe_valkey)
        await asyncio.to_thread(cluster.stores.valkey.start)  # same port, no data: a failover to an empty replica
    assert await cluster.redis.zmscore(QUEUE, doorbells) == [None] * QUEUED
    assert await cluster.statuses() == {"running": RUNNING, "queued": QUEUED}  # nothing finished meanwhile

    cluster.start_worker("fresh")  # its sweep re-dispatches the fifty from their rows
    rows = await cluster.all_done(RUNNING + QUEUED, within=45)
    done_at = time.time()

    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert all(r["attempt"] == 1 for r in rows.values())
    attempts = await cluster.attempts()
    for job_id in running:
        [only] = attempts[job_id]  # ran once, on the busy worker, and was still running when Redis lost it all
        assert only["pid"] == busy.pid and only["started_at"] < lost_at < only["ended_at"]
    assert all(len(attempts[job_id]) == 1 for job_id in queued)
    events = await cluster.events()
    assert not {job_id: p for job_id in rows if (p := lifecycle_problems(events[job_id]))}
    assert busy.poll() is None  # the busy worker rode out the loss without a restart

    requeued_in = max(rows[job_id]["finished_at"].timestamp() for job_id in queued) - lost_at
    figure(
        f"{loss}: {RUNNING + QUEUED}/{RUNNING + QUEUED} terminal (all succeeded) {done_at - lost_at:.1f}s after "
        f"the loss; the {QUEUED} queued jobs, re-dispatched from their rows, all done {requeued_in:.1f}s after it, "
        f"each run once; the {RUNNING} running ones ran exactly once (attempt 1, on the original worker, which kept "
        f"its pid)"
    )


OUTAGE_S = 4.0  # several of an idle worker's polls (one a second while it holds a job), each refused


async def test_a_worker_rides_out_redis_refusing_every_connection_and_its_running_job_succeeds(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    """Nothing listens on Redis's port for a while (a restart, a failover): a poll that must open a connection is
    refused, and the worker retries with backoff for OUTLAST_REDIS_OUTAGE_S, as it does for a dropped connection,
    instead of exiting at the first refusal."""
    cluster.start_web()
    worker = cluster.start_worker("w")
    await cluster.web_ready()
    await cluster.worker_ready("w")
    job_id = await cluster.submit("chaos_sleep", {"seconds": OUTAGE_S + 2})

    async def running() -> bool | None:
        return (await cluster.rows([job_id]))[job_id]["status"] == "running" or None

    await eventually(running)
    down_at = time.time()
    await asyncio.to_thread(cluster.stores.valkey.stop)
    await asyncio.sleep(OUTAGE_S)  # the fault's length, not a wait for an outcome
    await asyncio.to_thread(cluster.stores.valkey.start)
    assert worker.poll() is None, "the worker exited while Redis refused connections"

    after = await cluster.submit("chaos_sleep", {"seconds": 0.1})  # its doorbell reaches the same worker
    rows = await cluster.all_done(2, within=30)
    assert {r["status"] for r in rows.values()} == {"succeeded"}
    assert rows[job_id]["attempt"] == 1 and rows[after]["attempt"] == 1
    assert worker.poll() is None
    figure(
        f"Redis refused connections for {OUTAGE_S:.0f}s; the worker kept its pid, its running job succeeded on "
        f"attempt 1 and the next job {rows[after]['finished_at'].timestamp() - down_at:.1f}s after the outage began"
    )
