"""A zombie: a worker frozen (SIGSTOP) past its lease wakes up after its job was rescued and finished elsewhere."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.conftest import RESCUE_BOUND_S, Cluster, lifecycle_problems
from tests.conftest import eventually

pytestmark = pytest.mark.slow


async def test_a_frozen_worker_that_wakes_after_its_job_finished_elsewhere_changes_nothing(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    cluster.start_web()
    zombie = cluster.start_worker("zombie")
    await cluster.web_ready()
    await cluster.worker_ready("zombie")
    job_id = await cluster.submit("chaos_sleep", {"seconds": 2}, max_attempts=3)

    async def running_on_zombie() -> bool | None:  # claimed, and its code has begun (it records its attempt first)
        row = (await cluster.rows([job_id]))[job_id]
        began = [a for a in (await cluster.attempts()).get(job_id, []) if a["pid"] == zombie.pid]
        return (row["status"] == "running" and row["lease_owner"] == cluster.owner("zombie") and bool(began)) or None

    await eventually(running_on_zombie)
    # Frozen before the healthy worker starts, not after it is ready: attempt 1 can only be the zombie's, and it can't
    # finish its 2 s meanwhile (a crowded machine took longer than that to start a worker, and the zombie won).
    frozen = cluster.signal("zombie", signal.SIGSTOP)
    healthy = cluster.start_worker("healthy")
    await cluster.worker_ready("healthy")

    async def finished() -> dict[str, object] | None:
        row = (await cluster.rows([job_id]))[job_id]
        return row if row["status"] == "succeeded" else None

    before = await eventually(finished, within=RESCUE_BOUND_S + 10)
    events_before = (await cluster.events())[job_id]
    assert before["attempt"] == 2 and before["result"] == {"attempt": 2, "pid": healthy.pid}

    thawed = cluster.signal("zombie", signal.SIGCONT)

    # The zombie's attempt 1 runs on: its code ends (the sleep is long overdue, or the heartbeat finds the attempt
    # superseded and cancels it), then arq logs the end of run_job: whatever the zombie was going to write, it has.
    async def zombie_done() -> str | None:
        [first] = [a for a in (await cluster.attempts())[job_id] if a["attempt"] == 1]
        ended = first["outcome"] if first["ended_at"] is not None else None
        return ended if ended and f"← {job_id}:0:run_job" in cluster.log("zombie") else None

    outcome = await eventually(zombie_done, within=15)
    after = (await cluster.rows([job_id]))[job_id]
    events_after = (await cluster.events())[job_id]

    assert after == before  # no column changed: not status, result, attempt, finished_at, nor the event counter
    assert events_after == events_before
    assert [e.status for e in events_after if e.status in ("succeeded", "failed", "cancelled", "expired")] == [
        "succeeded"
    ]
    assert not lifecycle_problems(events_after)
    assert zombie.poll() is None  # alive and well: it just lost its claim
    rescued = next(e.at for e in events_after if e.status == "queued" and e.attempt == 1)
    finished_at = next(e.at for e in events_after if e.status == "succeeded")
    figure(
        f"attempt 1 frozen on pid {zombie.pid} for {thawed.at - frozen.at:.1f}s; rescued {rescued - frozen.at:.1f}s "
        f"after the SIGSTOP, attempt 2 succeeded on pid {healthy.pid} {finished_at - frozen.at:.1f}s after it; "
        f"the zombie's attempt ended '{outcome}' {time.time() - thawed.at:.1f}s after SIGCONT and changed nothing: "
        f"1 terminal event, result of attempt 2"
    )
