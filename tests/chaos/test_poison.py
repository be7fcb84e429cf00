"""Poison pills: job types that kill the worker running them (SIGKILL, os._exit(1)) fail after exactly max_attempts,
while the innocent jobs that share their workers all succeed."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.chaos.conftest import LEASE_S, SWEEP_INTERVAL_S, Cluster, holds, lifecycle_problems
from tests.conftest import eventually

pytestmark = pytest.mark.slow

SEED = 5
POISON_ATTEMPTS = 3
INNOCENTS = 20
# Each poison attempt kills one worker, so an innocent job can lose at most this many attempts: it cannot run out.
MAX_INNOCENT_ATTEMPTS = POISON_ATTEMPTS + 1
WORKERS = ("w0", "w1")
EXIT_CODE = {"chaos_suicide": -9, "chaos_exit": 1}


# One poison type per run: two poisons rescued in the same sweep are re-dispatched together, and one would kill
# the other's attempt before it ran a line, which blurs "exactly max_attempts runs".
@pytest.mark.parametrize("poison", ["chaos_suicide", "chaos_exit"])
async def test_a_poison_pill_fails_after_exactly_max_attempts_and_innocent_jobs_alongside_succeed(
    cluster: Cluster, figure: Callable[[str], None], poison: str
) -> None:
    rng = random.Random(SEED)
    await cluster.start_supervised(*WORKERS)
    started = time.monotonic()

    pill = await cluster.submit(poison, max_attempts=POISON_ATTEMPTS)
    innocents: list[str] = []
    for _ in range(INNOCENTS):  # spread over the poison's life, so that its crashes keep finding innocents running
        seconds = rng.uniform(0.2, 1.5)
        innocents.append(await cluster.submit("chaos_sleep", {"seconds": seconds}, max_attempts=MAX_INNOCENT_ATTEMPTS))
        await asyncio.sleep(0.5)

    rows = await cluster.all_done(1 + INNOCENTS, within=60)
    elapsed = time.monotonic() - started
    attempts = await cluster.attempts()
    events = await cluster.events()

    row = rows[pill]
    assert row["status"] == "failed" and row["error"]["type"] == "worker_lost", row
    assert row["attempt"] == POISON_ATTEMPTS and row["interrupted"] == 0, row
    assert [a["attempt"] for a in attempts[pill]] == list(range(1, POISON_ATTEMPTS + 1))  # its code ran 3 times
    assert all(a["ended_at"] is None for a in attempts[pill])  # and each time its process died under it
    lives = ["running", "queued"] * (POISON_ATTEMPTS - 1)  # each crash: rescued back to queued
    assert [e.status for e in events[pill]] == ["queued", *lives, "running", "failed"]
    assert {rows[i]["status"] for i in innocents} == {"succeeded"}
    assert not {i: p for i in rows if (p := lifecycle_problems(events[i]))}
    # Every crash was the pill's doing, and the supervisor brought the worker back each time.
    assert [e.code for e in cluster.exits] == [EXIT_CODE[poison]] * POISON_ATTEMPTS, cluster.exits

    hit = [i for i in innocents if rows[i]["attempt"] > 1]
    figure(
        f"{poison}: failed worker_lost after exactly {POISON_ATTEMPTS}/{POISON_ATTEMPTS} attempts (its code ran "
        f"{len(attempts[pill])} times, each killing its worker: exit codes {[e.code for e in cluster.exits]}, all "
        f"restarted); {INNOCENTS}/{INNOCENTS} innocents succeeded, {len(hit)} after losing an attempt to the pill's "
        f"crash (max attempt {max(rows[i]['attempt'] for i in innocents)}); {elapsed:.1f}s"
    )


async def test_jobs_a_worker_had_just_taken_from_redis_when_it_died_still_run(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    """The pill and 40 innocents wait in Redis before any worker exists, so the first poll takes them in one batch:
    the pill kills its worker while arq is still starting the innocents, and some are left marked in progress (for
    a day) with their rows never claimed. The sweep must clear such a mark and ring again. (Found by this suite:
    it used to re-ring the same arq job id, which arq ignores while the mark lives, and the job sat queued.)"""
    cluster.start_web()
    await cluster.web_ready()
    await cluster.submit("chaos_suicide", max_attempts=1)
    for _ in range(40):
        await cluster.submit("chaos_sleep", {"seconds": 0.1}, max_attempts=3)
    cluster.start_worker("w0")
    cluster.supervise("w0")
    await eventually(holds(lambda: bool(cluster.exits)))
    orphans = [r for r in (await cluster.rows()).values() if r["status"] == "queued" and await cluster.orphaned(r)]
    rows = await cluster.all_done(41, within=LEASE_S + SWEEP_INTERVAL_S + 15)
    assert Counter(r["status"] for r in rows.values()) == {"succeeded": 40, "failed": 1}
    last = max(r["finished_at"] for r in rows.values()).timestamp() - cluster.exits[0].at
    figure(
        f"the pill's crash left {len(orphans)} of 40 jobs marked in progress by the dead worker, unclaimed; "
        f"all 40 succeeded, the last {last:.1f}s after the crash"
    )
