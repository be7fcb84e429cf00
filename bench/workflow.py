"""A workflow's 1,000-way map of noop jobs and its fan-in, against the same 1,000 noop jobs as one batch.

Both sides run on the same Outlast web and worker processes, started once: the workflow (`bench_items` makes the
list, `noop` is mapped over it, `bench_join` counts the results) timed from its POST until the workflow is
`succeeded`; the baseline, one `POST /v1/jobs/batch` of 1,000 `noop` jobs, timed from the POST until all of them
succeeded. The tables are emptied and Redis flushed before each side. Goals (issue 16):

- end to end, the workflow takes at most 1.5x the batch's time;
- write transactions per mapped job (counted exactly, from the transaction-id counter, over the whole side) at most
  those of an independent job + 1: the baseline figure is the batch's per job, plus one;
- from the last mapped job's finish to the fan-in's start, p50 at most 100 ms (a figure, not a ratio: in the notes).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import asyncpg
import httpx

from bench.compare import Comparison, Figures, Metric, alternate
from bench.noop_jobs import next_xid, reset_outlast
from bench.procs import until
from bench.run import Run, outlast_env
from worker.connections import QUEUE

WEB, WORKER = "workflow-outlast-web", "workflow-outlast-worker"
ITEMS = 1_000
POLL_S = 0.01
METRICS = [
    Metric("elapsed_s", "1,000-way map + fan-in, s end to end", higher_is_better=False, goal=1.5),
    Metric("writes_per_job", "write transactions per mapped job", higher_is_better=False, goal=1.0),
]
STEPS = [
    {"name": "items", "type": "bench_items", "input": {"n": ITEMS}},
    {"name": "work", "type": "noop", "map": "items"},
    {"name": "join", "type": "bench_join", "after": ["work"], "input": {"of": "work"}},
]


async def measure(run: Run) -> Comparison:
    env = outlast_env(run.svc)
    url, _ = await asyncio.gather(
        run.fleet.outlast(WEB, env),
        run.fleet.worker(WORKER, "worker.settings.WorkerSettings", env, run.svc.redis_url, QUEUE),
    )
    db = await asyncpg.connect(run.svc.database_url)
    http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {run.api_key}"}, timeout=60)
    fan_in_ms: list[float] = []

    async def workflow(record: bool = True) -> Figures:
        await reset_outlast(run)
        xid0, t0 = await next_xid(db), time.perf_counter()
        answer = await http.post("/v1/workflows", json={"steps": STEPS})
        answer.raise_for_status()
        workflow_id = answer.json()["id"]

        async def over() -> bool:
            return await db.fetchval("SELECT status FROM workflows WHERE id = $1", workflow_id) != "running"

        await until(over, within=120, what="the side finishing", every_s=POLL_S)
        elapsed, xid1 = time.perf_counter() - t0, await next_xid(db)
        status = await db.fetchval("SELECT status FROM workflows WHERE id = $1", workflow_id)
        if status != "succeeded":
            raise RuntimeError(f"the workflow ended {status}")
        gap = await db.fetchval(
            "SELECT extract(epoch FROM (SELECT started_at FROM jobs WHERE step = 'join')"
            " - (SELECT max(finished_at) FROM jobs WHERE step = 'work'))::float8"
        )
        if record:
            fan_in_ms.append(1000 * gap)
        return {"elapsed_s": elapsed, "writes_per_job": (xid1 - xid0) / ITEMS, "fan_in_ms": 1000 * gap}

    async def batch() -> Figures:
        await reset_outlast(run)
        xid0, t0 = await next_xid(db), time.perf_counter()
        answer = await http.post("/v1/jobs/batch", json={"jobs": [{"type": "noop"}] * ITEMS})
        answer.raise_for_status()

        async def over() -> bool:
            return await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'") == ITEMS

        await until(over, within=120, what="the side finishing", every_s=POLL_S)
        elapsed, xid1 = time.perf_counter() - t0, await next_xid(db)
        return {"elapsed_s": elapsed, "writes_per_job": (xid1 - xid0) / ITEMS + 1}

    comparison = Comparison("workflow", f"{ITEMS} noop jobs in one POST /v1/jobs/batch, same processes", METRICS)
    try:
        await workflow(record=False)  # warm both processes' pools and statements
        await batch()
        await alternate(comparison, workflow, batch, run.settings.rounds)
        comparison.notes.update(
            items=ITEMS,
            fan_in_ms_p50=statistics.median(fan_in_ms),
            fan_in_ms_max=max(fan_in_ms),
            fan_in_goal_ms=100,
        )
        return comparison
    finally:
        await http.aclose()
        await db.close()
        await run.fleet.stop(WEB)
        await run.fleet.stop(WORKER)
        await reset_outlast(run)
