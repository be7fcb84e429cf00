"""A SIGKILL storm over limited and scheduled work: three supervised workers, killed at random and on purpose at
the instant a minute's cron tick falls due, while they run jobs under a per-key concurrency limit, delayed jobs and
ten per-minute schedules.

What must hold: no key ever runs more than its limit (by the attempts' own records, not a sample), no key is left
holding a slot once its jobs are done, every delayed job starts no earlier than its run_at, and each schedule makes
exactly one job for the tick, however many workers were killed in the middle of making it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.chaos.conftest import Cluster, holds
from tests.conftest import eventually

pytestmark = pytest.mark.slow

SEED = 20261202
WORKERS = ("w0", "w1", "w2")
KEYS, PER_KEY, LIMIT = 4, 30, 2  # chaos_keyed declares concurrency=2 (tests/chaos/jobs.py)
DELAYED = 30
SCHEDULES = 10
STORM_S = 15.0  # random kills while the keyed and delayed jobs run; then only those aimed at the tick
MAX_ATTEMPTS = 20  # more than all the kills: each costs a running job one attempt at most
# Kills aimed at the tick: just before it is due, as the tickers wake for it, and while its jobs are inserted.
AT_THE_TICK = ((-0.05, "w0"), (0.0, "w1"), (0.02, "w2"), (0.1, "w0"), (0.3, "w1"))


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _peaks(cluster: Cluster, key_of: dict[str, str]) -> dict[str, int]:
    """The most attempts of each key alive at once: each from its start to its end, or to the kill of its process."""
    killed_at = {f.pid: f.at for f in cluster.faults}
    edges: dict[str, list[tuple[float, int]]] = {}
    for job_id, attempts in (await cluster.attempts()).items():
        for a in attempts if job_id in key_of else []:
            end = a["ended_at"] if a["ended_at"] is not None else killed_at[a["pid"]]
            edges.setdefault(key_of[job_id], []).extend([(a["started_at"], 1), (end, -1)])
    peaks = {}
    for key, points in edges.items():
        alive = peak = 0
        for _, step in sorted(points):  # at the same instant an end (-1) sorts before a start
            alive += step
            peak = max(peak, alive)
        peaks[key] = peak
    return peaks


@pytest.mark.timeout(200)
async def test_kills_leave_no_key_over_or_stuck_at_its_limit_and_no_tick_run_twice_or_lost(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    rng = random.Random(SEED)
    await cluster.start_supervised(*WORKERS)

    for i in range(SCHEDULES):
        body = {"id": f"tick-{i}", "cron": "* * * * *", "type": "chaos_sleep", "input": {"seconds": 0.2}}
        made = await cluster.http.post("/v1/schedules", json=body)
        assert made.status_code == 201, made.text
    tick = _epoch(made.json()["next_run_at"])  # every schedule's first tick: the next whole minute

    keyed = [
        {"type": "chaos_keyed", "input": {"seconds": rng.uniform(0.2, 0.8)}, "concurrency_key": f"k{n % KEYS}"}
        for n in range(KEYS * PER_KEY)
    ]
    delayed = [
        {"type": "chaos_sleep", "input": {"seconds": 0.1}, "delay_s": round(rng.uniform(1, 20), 3)}
        for _ in range(DELAYED)
    ]
    batch = {"jobs": [{**job, "max_attempts": MAX_ATTEMPTS} for job in keyed + delayed]}
    answer = await cluster.http.post("/v1/jobs/batch", json=batch)
    assert answer.status_code == 202, answer.text
    items = answer.json()["items"]
    run_at = {job["id"]: _epoch(job["run_at"]) for job in items[len(keyed) :]}

    # Random kills for STORM_S, and a burst aimed at the tick.
    kills = [(time.time() + rng.uniform(1.0, 2.5), rng.choice(WORKERS))]
    while kills[-1][0] < time.time() + STORM_S:
        kills.append((kills[-1][0] + rng.uniform(1.0, 2.5), rng.choice(WORKERS)))
    kills += [(tick + offset, name) for offset, name in AT_THE_TICK]
    kills.sort()
    assert len(kills) < MAX_ATTEMPTS

    async def killer() -> None:
        for at, name in kills:
            await asyncio.sleep(max(0.0, at - time.time()))
            cluster.signal(name, signal.SIGKILL)

    await killer()

    async def ticked() -> bool | None:  # by a ticker of a worker the supervisor restarted, on a crowded machine late
        made = await cluster.fetch("SELECT count(*) FROM jobs WHERE metadata ? 'schedule_id'")
        return made[0][0] >= SCHEDULES or None

    await eventually(ticked, within=max(1.0, tick + 50 - time.time()))
    # No second tick: paused now, the count of tick jobs is exactly one per schedule.
    for i in range(SCHEDULES):
        paused = await cluster.http.patch(f"/v1/schedules/tick-{i}", json={"paused": True})
        assert paused.status_code == 200, paused.text
    assert time.time() < tick + 60, "the storm ran past the second tick; the counts below would be off"

    rows = await cluster.all_done(len(keyed) + DELAYED + SCHEDULES, within=90)
    await eventually(holds(lambda: len(cluster.exits) == len(kills)))  # every kill landed, every worker came back
    assert {r["status"] for r in rows.values()} == {"succeeded"}, [
        (r["id"], r["type"], r["status"], r["error"]) for r in rows.values() if r["status"] != "succeeded"
    ]

    # Each schedule made one job for its tick: none twice, none lost.
    ticks = sorted(
        (r["metadata"]["schedule_id"], _epoch(r["metadata"]["scheduled_for"]))
        for r in rows.values()
        if "schedule_id" in r["metadata"]
    )
    assert ticks == [(f"tick-{i}", tick) for i in range(SCHEDULES)], ticks

    # Never more than LIMIT attempts of one key alive at once, from what each attempt recorded, and no slot still
    # held once all is done.
    peaks = await _peaks(cluster, {str(r["id"]): r["concurrency_key"] for r in rows.values() if r["concurrency_key"]})
    assert peaks == {f"k{n}": LIMIT for n in range(KEYS)}, peaks  # at the limit (so it was tested), never over
    held = await cluster.fetch("SELECT key, running FROM concurrency_slots WHERE running <> 0")
    assert not held, [dict(r) for r in held]

    # A delayed job's first attempt starts at its run_at or later, kills or not.
    firsts = await cluster.fetch(
        "SELECT job_id::text, min(extract(epoch FROM created_at))::float8 AS at FROM job_events"
        " WHERE name = 'status' AND data->>'status' = 'running' AND job_id = ANY($1::uuid[]) GROUP BY 1",
        list(run_at),
    )
    early = {r["job_id"]: run_at[r["job_id"]] - r["at"] for r in firsts if r["at"] < run_at[r["job_id"]]}
    assert len(firsts) == DELAYED and not early, early
    lateness = sorted(r["at"] - run_at[r["job_id"]] for r in firsts)

    orphaned = sum(a["ended_at"] is None for attempts in (await cluster.attempts()).values() for a in attempts)
    figure(
        f"{len(rows)}/{len(rows)} succeeded through {len(cluster.faults)} SIGKILLs ({len(AT_THE_TICK)} at the tick),"
        f" {orphaned} attempts killed mid-run; per-key peak {max(peaks.values())} of {LIMIT}, 0 slots held after;"
        f" {SCHEDULES} schedules, 1 job each for the tick; delayed jobs started {lateness[0]:.2f}-{lateness[-1]:.2f}s"
        " after run_at"
    )
