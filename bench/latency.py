"""Idle submit → running latency: Outlast (1 web + 1 worker) against a bare arq worker with its defaults.

One job at a time on an otherwise idle system, each after a random pause of up to 0.5 s (the same on both
sides), so that submits land at random points of each worker's poll cycle rather than just after the poll
that ran the previous job. Outlast's figure runs from sending `POST /v1/jobs` until the row's `started_at`
(set by the claim that makes it `running`); arq's from calling `enqueue_job` until arq starts the job (its
result's `start_time`). Both clocks are this machine's wall clock; the poller's own delay is not in either.

Issue 20's S9 from the same rounds: Outlast's p50 (and p99) against 5 ms; and then an idle worker's Redis commands a
second against 5: a fresh worker on a Valkey of its own that nothing else uses (started here, so every command it
counts is the worker's), left IDLE_SETTLE_S after its first poll, then IDLE_WINDOWS windows of IDLE_WINDOW_S, each
counted exactly as the delta of `INFO commandstats` (the bench's own INFO calls left out).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Metric, alternate
from bench.noop_jobs import ARQ, reset_outlast, start_arq, start_outlast, stop_outlast
from bench.procs import load
from bench.run import Run, outlast_env
from bench.services import free_port
from worker.connections import QUEUE

GAP_S = 0.5  # arq's default poll delay: a pause drawn from [0, this) puts a submit anywhere in its cycle
METRICS = [
    Metric("p50_ms", "idle submit to running p50 ms", higher_is_better=False, goal=0.2),
    Metric("p99_ms", "idle submit to running p99 ms", higher_is_better=False, goal=0.25),
]

PICKUP_GOAL_MS = 5.0  # S9: SAQ's blocking pop picks up in 2-4 ms
PICKUP = [
    Metric("p50_ms", "S9 idle submit to running p50 ms ÷ 5 ms", higher_is_better=False, goal=1.0),
    Metric("p99_ms", "S9 idle submit to running p99 ms ÷ 5 ms", higher_is_better=False),
    Metric("row_ms", "S9 its INSERT to running p50 ms ÷ 5 ms", higher_is_better=False),
]
ROW_TO_RUNNING_P50_MS = """
SELECT 1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))
FROM jobs WHERE created_at > $1"""
COMMANDS_GOAL_PER_S = 5.0  # S9: arq polling every 50 ms sends about 100
COMMANDS = [Metric("commands_per_s", "S9 an idle worker's Redis commands/s ÷ 5", higher_is_better=False, goal=1.0)]
IDLE_WORKER = "outlast-worker-idle-redis"
IDLE_SETTLE_S = 5.0
IDLE_WINDOWS = 3
IDLE_WINDOW_S = 10.0


async def measure(run: Run) -> list[Comparison]:
    against_arq = await _against_arq(run)
    pickup = Comparison("idle_pickup", f"{PICKUP_GOAL_MS:g} ms", PICKUP, notes=dict(against_arq.notes))
    goal = dict.fromkeys(("p50_ms", "p99_ms", "row_ms"), PICKUP_GOAL_MS)
    pickup.rounds = [(ours, goal) for ours, _ in against_arq.rounds]
    return [against_arq, pickup, await idle_commands(run)]


def _calls(stats: dict[str, Any]) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


async def idle_commands(run: Run) -> Comparison:
    """S9's count: every command a fresh, idle worker sends its own Valkey, window by window."""
    from worker.tools.embedded import EmbeddedValkey

    counted = Comparison("idle_redis", f"{COMMANDS_GOAL_PER_S:g} a second", COMMANDS)
    counted.notes.update(window_s=IDLE_WINDOW_S, windows=IDLE_WINDOWS, settle_s=IDLE_SETTLE_S)
    with EmbeddedValkey(run.scratch / "valkey-idle", port=free_port()) as valkey:
        url = valkey.url()
        redis = Redis.from_url(url)
        try:
            await run.fleet.worker(
                IDLE_WORKER, "worker.settings.WorkerSettings", {**outlast_env(run.svc), "REDIS_URL": url}, url, QUEUE
            )
            await asyncio.sleep(IDLE_SETTLE_S)
            before = _calls(await redis.info("commandstats"))
            for _ in range(IDLE_WINDOWS):
                await asyncio.sleep(IDLE_WINDOW_S)
                after = _calls(await redis.info("commandstats"))
                sent = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
                per_s = sum(sent.values()) / IDLE_WINDOW_S
                print(f"bench: idle worker's Redis commands {per_s:.2f}/s: {sent}", file=sys.stderr, flush=True)
                counted.rounds.append(({"commands_per_s": per_s}, {"commands_per_s": COMMANDS_GOAL_PER_S}))
                counted.notes.setdefault("sent_by_window", []).append(sent)
                before = after
        finally:
            await run.fleet.stop(IDLE_WORKER)
            await redis.aclose()
    return counted


async def _against_arq(run: Run) -> Comparison:
    s = run.settings
    samples = ["--samples", str(s.latency_samples), "--gap", str(GAP_S)]
    baseline_redis = Redis.from_url(run.svc.baseline_redis_url)
    db = await asyncpg.connect(run.svc.database_url)
    try:
        await reset_outlast(run)
        await baseline_redis.flushdb()
        url, _ = await asyncio.gather(start_outlast(run), start_arq(run))

        async def outlast() -> Figures:
            args = ["--database-url", run.svc.database_url, "--api-key", run.api_key, *samples]
            since = await db.fetchval("SELECT now()")
            figures = await load("latency", "--url", url, *args)
            # The worker's part alone, by the database clock: from the submit's INSERT to the claim.
            row_ms = await db.fetchval(ROW_TO_RUNNING_P50_MS, since)
            return {**{m.key: figures[m.key] for m in METRICS}, "row_ms": float(row_ms)}

        async def baseline() -> Figures:
            figures = await load("latency-arq", "--redis-url", run.svc.baseline_redis_url, *samples)
            return {m.key: figures[m.key] for m in METRICS}

        comparison = Comparison("latency", "arq defaults: poll 0.5 s, max_jobs 10, pickle", METRICS)
        comparison.notes.update(samples_per_round=s.latency_samples, gap_s=GAP_S)
        return await alternate(comparison, outlast, baseline, s.rounds)
    finally:
        await stop_outlast(run)
        await run.fleet.stop(ARQ)
        await baseline_redis.aclose()
        await db.close()
