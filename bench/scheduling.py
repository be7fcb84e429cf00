"""The drain with concurrency keys and priorities in use, against the same drain without them.

All sides are Outlast: 2,000 noop jobs preloaded as `POST /v1/jobs` makes them, then one worker started to run
them all (bench/drain.py's round, figure and timing); each round measures the three in alternating order.

- plain (the baseline): `noop` at priority 0, no key.
- drain_keyed (the goal, at least 0.8x plain): `noop_keyed` (bench/keyed_job.py: at most 2 at once per key) over
  200 keys, as per-customer keys are, each job with a priority drawn from -10..10. The limit binds now and then
  (several of one key's ten jobs among the hundred in flight), so turned-away jobs and their wakes are measured.
- drain_hot_keys (no goal, reported): the same over 20 keys, so at most 40 of the worker's 100 slots can be used,
  and every claim and finish meets the same 20 key rows: what a few hot keys cost a drain.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable

import asyncpg
from uuid_utils.compat import uuid7

from bench.compare import Comparison, Figures, Measure, Metric
from bench.drain import WORKER, drain_outlast
from bench.keyed_job import CONCURRENCY
from bench.run import Run
from worker import Config, store

KEYS, HOT_KEYS = 200, 20
BASELINE = "the same drain: noop, priority 0, no concurrency key"


def keyed(keys: int, seed: int) -> Callable[[Config, int], store.NewJob]:
    """The i-th keyed job: key i mod `keys`, a priority drawn from `seed`'s sequence."""
    draw = random.Random(seed)

    def make(config: Config, i: int) -> store.NewJob:
        return store.NewJob(
            id=uuid7(), tenant="default", type="noop_keyed", input=b"{}", max_attempts=config.default_max_attempts,
            timeout_s=60, retry_safe=True, callback_url=None, metadata=b"{}", ttl_s=config.job_ttl_s,
            priority=draw.randint(-10, 10), concurrency_key=f"k{i % keys}",
        )  # fmt: skip

    return make


async def measure(run: Run) -> list[Comparison]:
    jobs = run.settings.drain_jobs
    db = await asyncpg.connect(run.svc.database_url)
    label = "drain with keys + priorities jobs/s"
    comparisons = {
        "drain_keyed": Comparison("drain_keyed", BASELINE, [Metric("jobs_per_s", label, True, goal=0.8)]),
        "drain_hot_keys": Comparison("drain_hot_keys", BASELINE, [Metric("jobs_per_s", f"{label}, 20 hot keys", True)]),
    }
    comparisons["drain_keyed"].notes.update(keys=KEYS, concurrency_per_key=CONCURRENCY, priorities="-10..10")
    comparisons["drain_hot_keys"].notes.update(keys=HOT_KEYS, concurrency_per_key=CONCURRENCY, priorities="-10..10")
    sides: list[tuple[str, Measure]] = [
        ("plain", lambda: drain_outlast(run, db, jobs)),
        ("drain_keyed", lambda: drain_outlast(run, db, jobs, keyed(KEYS, len(comparisons["drain_keyed"].rounds)))),
        ("drain_hot_keys", lambda: drain_outlast(run, db, jobs, keyed(HOT_KEYS, 1))),
    ]
    try:
        for i in range(run.settings.rounds):  # the order reverses every round, as bench/compare.py's alternate does
            figures: dict[str, Figures] = {}
            for name, side in sides if i % 2 == 0 else reversed(sides):
                figures[name] = await side()
                print(f"bench: round {i + 1} {name}: {figures[name]['jobs_per_s']:.0f} jobs/s", file=sys.stderr)
            for name, comparison in comparisons.items():
                comparison.rounds.append((figures[name], figures["plain"]))
        return list(comparisons.values())
    finally:
        await run.fleet.stop(WORKER)
        await db.close()
