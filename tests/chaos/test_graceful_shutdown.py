"""SIGTERM with 8 running jobs of mixed lengths and kinds: the short ones finish, the long retry-safe ones go back
to queued without using up an attempt (and then succeed elsewhere), the long unsafe ones fail `interrupted`, and the
worker is gone within its grace period."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.chaos.conftest import Cluster, lifecycle_problems
from tests.conftest import eventually

pytestmark = pytest.mark.slow

GRACE_S = 3
# After the grace, arq cancels the 4 unfinished tasks; each writes its hand-back (two statements and, for a
# retry-safe one, an enqueue), then arq closes its pools and the interpreter exits. That is tens of milliseconds;
# arq also checks for finished tasks only every 0.1 s. 1.5 s covers a loaded 2-core machine with room to spare,
# and is still far below what would hint at the grace being ignored (the long jobs sleep 60 s).
MARGIN_S = 1.5
SHORT_S, LONG_S = 1.5, 60.0
KINDS = {
    "short_safe": ("chaos_sleep", {"seconds": SHORT_S}),
    "short_unsafe": ("chaos_once", {"seconds": SHORT_S}),
    "long_safe": ("chaos_sleep", {"seconds": LONG_S, "later_seconds": 0.2}),
    "long_unsafe": ("chaos_once", {"seconds": LONG_S}),
}


async def test_sigterm_finishes_short_jobs_hands_back_long_safe_ones_uncounted_and_exits_within_the_grace(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    cluster.start_web()
    leaving = cluster.start_worker("leaving", OUTLAST_SHUTDOWN_GRACE_S=str(GRACE_S))
    await cluster.web_ready()
    await cluster.worker_ready("leaving")
    jobs = {
        kind: [await cluster.submit(t, input, max_attempts=1) for _ in range(2)] for kind, (t, input) in KINDS.items()
    }
    ids = [job_id for pair in jobs.values() for job_id in pair]

    async def all_running() -> bool | None:
        rows = await cluster.rows(ids)
        return (
            all(r["status"] == "running" and r["lease_owner"] == cluster.owner("leaving") for r in rows.values())
            or None
        )

    await eventually(all_running)
    term = cluster.signal("leaving", signal.SIGTERM)
    try:
        code = await asyncio.to_thread(leaving.wait, GRACE_S + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker ignored SIGTERM for {GRACE_S + 30}s")
    exited = time.time()
    took = exited - term.at
    assert took <= GRACE_S + MARGIN_S, took

    # Right after the exit, before any other worker could touch them:
    rows = await cluster.rows(ids)
    for job_id in jobs["short_safe"] + jobs["short_unsafe"]:  # finished inside the grace
        row = rows[job_id]
        assert row["status"] == "succeeded" and row["attempt"] == 1, row
        assert row["finished_at"].timestamp() < term.at + GRACE_S
    for job_id in jobs["long_safe"]:  # handed back, the attempt not counted
        row = rows[job_id]
        assert row["status"] == "queued" and row["attempt"] == 1 and row["interrupted"] == 1, row
        assert row["attempt"] - row["interrupted"] == 0  # so max_attempts=1 still allows a full attempt
    for job_id in jobs["long_unsafe"]:  # not retry-safe: ended
        row = rows[job_id]
        assert row["status"] == "failed" and row["error"]["type"] == "interrupted" and row["attempt"] == 1, row

    successor = cluster.start_worker("successor")

    async def handed_back_done() -> bool | None:
        rows = await cluster.rows(jobs["long_safe"])
        return all(r["status"] == "succeeded" for r in rows.values()) or None

    await eventually(handed_back_done, within=30)
    rows = await cluster.rows(ids)
    for job_id in jobs["long_safe"]:
        row = rows[job_id]
        assert row["attempt"] == 2 and row["interrupted"] == 1 and row["result"] == {"attempt": 2, "pid": successor.pid}
    events = await cluster.events()
    assert not {job_id: p for job_id in ids if (p := lifecycle_problems(events[job_id]))}
    attempts = await cluster.attempts()
    for job_id in jobs["long_safe"] + jobs["long_unsafe"]:
        first = attempts[job_id][0]  # the interrupted attempt's code saw the cancellation
        assert first["pid"] == leaving.pid and first["outcome"] == "cancelled"
        assert term.at + GRACE_S - 0.2 <= first["ended_at"] <= exited

    figure(
        f"grace {GRACE_S}s: the worker exited (code {code}) {took:.2f}s after SIGTERM (bound {GRACE_S + MARGIN_S}s); "
        f"2+2 short jobs ({SHORT_S}s) succeeded inside the grace; 2 long retry-safe went back to queued "
        f"(interrupted=1, attempt not counted, max_attempts=1) and succeeded on the next worker as attempt 2; "
        f"2 long unsafe failed 'interrupted'"
    )
