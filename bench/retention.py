"""Retention over 1,000,000 jobs past it (issue 19): each sweep pass's duration, and submits meanwhile against submits
on an idle table.

The bench database gets 1,000,000 ended jobs, finished 40 days ago (past both retentions, their results already
purged), each with its three status events; one in ten has a callback_url and a delivered webhook with its attempt,
one in ten an Idempotency-Key: all in a few `INSERT … SELECT generate_series` statements, then VACUUM ANALYZE, as a
table whose rows aged for a month would be. A second database beside it (`outlast_bench_idle`) stays empty.

Each round, in an order that reverses every round, four sides of POST /v1/jobs noop submits (bench/load.py `post`,
the submit_job load): at a web process on the loaded database while this process runs the engine's sweep
(worker/sweep.py `sweep_once`, with the worker's configuration) a pass a second, as one worker at the shortest
`OUTLAST_SWEEP_INTERVAL_S` does, or five at the default 5 s (`retention`, the goal); the same with passes back to
back, as fast as one sweeper goes (`retention_flat_out`, no goal: the worst case, which on 2 cores mostly measures
the CPU the passes take from the submits); the same with no pass at all (`retention_unswept`, no goal: what the
million rows cost a submit by themselves); and the same load at a web process on the idle database with nothing
else running, the baseline of all three. Each side's submits are deleted before the next, so no side writes into
another's rows. After the rounds the passes go on back to back, alone, until no job past retention is left. The
pass goal is a figure, not a ratio: every pass under 250 ms (in the notes, and in the summary line).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench.compare import Comparison, Figures, Measure, Metric
from bench.noop_jobs import reset_outlast
from bench.procs import load
from bench.run import Run, outlast_env
from bench.services import api_key, with_database
from worker import deps as engine
from worker.config import from_env
from worker.migrate import create_database, migrate
from worker.sweep import sweep_once

JOBS = int(os.environ.get("BENCH_RETENTION_JOBS", 1_000_000))  # fewer only for a quick look at the bench itself
PASS_GOAL_MS = 250.0
IDLE_DATABASE = "outlast_bench_idle"
LOADED, IDLE = "retention-loaded-web", "retention-idle-web"  # process names, and their logs' names
PACE_S = 1.0  # between the starts of two passes on the `retention` side
METRICS = [
    Metric("p99_ms", "POST /v1/jobs p99 ms, a retention pass a second", higher_is_better=False, goal=1.5),
    Metric("p50_ms", "POST /v1/jobs p50 ms, a retention pass a second", higher_is_better=False),
    Metric("rps", "POST /v1/jobs accepted/s, a retention pass a second", higher_is_better=True),
]
FLAT_OUT_METRICS = [
    Metric(m.key, m.label.replace("a retention pass a second", "retention passes back to back"), m.higher_is_better)
    for m in METRICS
]
UNSWEPT_METRICS = [
    Metric(m.key, m.label.replace("a retention pass a second", "on the 1M table, no pass"), m.higher_is_better)
    for m in METRICS
]
BASELINE = "the same submits on an idle, empty jobs table"

# Ids as uuid v7 makes them: the creation millisecond first, so they sort by time as Outlast's do.
_LOAD_JOBS = """
INSERT INTO jobs (id, type, status, input, attempt, max_attempts, timeout_s, retry_safe, next_run_at, dispatched_at,
                  result_purged_at, error, callback_url, idempotency_key, request_hash, event_seq, created_at,
                  started_at, finished_at, expires_at)
SELECT encode(overlay(uuid_send(gen_random_uuid())
                      PLACING substring(int8send((extract(epoch FROM created) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
              'hex')::uuid,
       'noop', status, '{}', 1, 3, 60, true, created, created,
       CASE WHEN status = 'succeeded' THEN created + interval '7 days' END,
       CASE WHEN status <> 'succeeded' THEN '{"type": "boom", "message": "it failed", "retryable": false}'::jsonb END,
       CASE WHEN i % 10 = 0 THEN 'https://example.com/hook' END,
       CASE WHEN i % 10 = 1 THEN 'key-' || i END, CASE WHEN i % 10 = 1 THEN '\\x00'::bytea END,
       3, created, created, created + interval '1 second', created + interval '7 days'
  FROM (SELECT i, now() - interval '40 days' + i * interval '1 millisecond' AS created,
               CASE WHEN i % 100 < 90 THEN 'succeeded' WHEN i % 100 < 97 THEN 'failed'
                    WHEN i % 100 < 99 THEN 'cancelled' ELSE 'expired' END AS status
          FROM generate_series(1, $1) AS i) AS s
"""
_LOAD_EVENTS = """
INSERT INTO job_events (job_id, seq, name, data, created_at)
SELECT id, seq, 'status',
       jsonb_build_object('status', CASE seq WHEN 1 THEN 'queued' WHEN 2 THEN 'running' ELSE status END,
                          'attempt', least(seq - 1, 1)),
       created_at
  FROM jobs, generate_series(1, 3) AS seq
"""
_LOAD_WEBHOOKS = """
WITH delivered AS (
    INSERT INTO webhook_deliveries (job_id, url, reason, status, attempts, next_try_at, created_at, finished_at)
    SELECT id, callback_url, 'finished', 'delivered', 1, finished_at, finished_at, finished_at
      FROM jobs WHERE callback_url IS NOT NULL
    RETURNING id, created_at
)
INSERT INTO webhook_attempts (delivery_id, n, started_at, finished_at, status_code, latency_ms)
SELECT id, 1, created_at, created_at, 200, 12 FROM delivered
"""
_PAST_RETENTION = "SELECT count(*) FROM jobs WHERE finished_at < now() - make_interval(secs => $1)"
_LEFT = """
SELECT (SELECT count(*) FROM jobs) AS jobs_left, (SELECT count(*) FROM job_events) AS events_left,
       (SELECT count(*) FROM webhook_deliveries) AS deliveries_left,
       (SELECT count(*) FROM webhook_attempts) AS attempts_left
"""


@dataclasses.dataclass
class Passes:
    """Every sweep pass: its duration, the jobs it deleted, and the side it ran in (`paced`, `flat_out`, `alone`)."""

    ms: list[float] = dataclasses.field(default_factory=list)
    deleted: list[int] = dataclasses.field(default_factory=list)
    side: list[str] = dataclasses.field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load_table(conn: asyncpg.Connection, jobs: int) -> dict[str, float]:
    took: dict[str, float] = {}
    for name, statement, args in (
        ("jobs", _LOAD_JOBS, (jobs,)),
        ("events", _LOAD_EVENTS, ()),
        ("webhooks", _LOAD_WEBHOOKS, ()),
        ("vacuum_analyze", "VACUUM ANALYZE", ()),
    ):
        started = time.monotonic()
        await conn.execute(statement, *args)
        took[f"load_{name}_s"] = round(time.monotonic() - started, 1)
    return took


async def _pass(deps: engine.Deps, passes: Passes, side: str) -> int:
    """One timed sweep pass; the jobs it deleted."""
    started = time.perf_counter()
    retained = await sweep_once(deps)
    passes.ms.append(1000 * (time.perf_counter() - started))
    passes.deleted.append(retained.deleted)
    passes.side.append(side)
    return retained.deleted


@contextlib.asynccontextmanager
async def _sweeping(deps: engine.Deps, passes: Passes, side: str, pace_s: float) -> AsyncIterator[None]:
    """A pass every `pace_s` (0: back to back) while the block runs; the last one ends before the block does (a
    pass cancelled mid-statement would leave its pooled connection in doubt)."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            await _pass(deps, passes, side)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, pace_s - (time.monotonic() - started)))

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def _reset(database_url: str, redis_url: str, statement: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def measure(run: Run) -> list[Comparison]:
    s, svc = run.settings, run.svc
    idle_url = with_database(svc.database_url, IDLE_DATABASE)
    admin = await asyncpg.connect(svc.admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {IDLE_DATABASE} WITH (FORCE)")
    finally:
        await admin.close()
    await create_database(idle_url)
    await migrate(idle_url)
    idle_key = await api_key(dataclasses.replace(svc, database_url=idle_url))

    await reset_outlast(run)
    conn = await asyncpg.connect(svc.database_url)
    config = from_env(outlast_env(svc))
    paced = Comparison("retention", BASELINE, METRICS)
    flat_out = Comparison("retention_flat_out", BASELINE, FLAT_OUT_METRICS)
    unswept = Comparison("retention_unswept", BASELINE, UNSWEPT_METRICS)
    passes = Passes()
    try:
        print(f"bench: loading {JOBS:,} jobs past retention", file=sys.stderr, flush=True)
        paced.notes.update(jobs=JOBS, sweep_batch=config.sweep_batch, pace_s=PACE_S, **await _load_table(conn, JOBS))
        loaded_url, idle_web = await asyncio.gather(
            run.fleet.outlast(LOADED, outlast_env(svc)),
            run.fleet.outlast(IDLE, {**outlast_env(svc), "DATABASE_URL": idle_url}),
        )
        timing = ["--concurrency", str(s.concurrency), "--warmup", str(s.warmup_s), "--duration", str(s.duration_s)]
        submits_only = "DELETE FROM jobs WHERE status = 'queued'"  # no worker runs them; found by jobs_queued_due

        async with engine.connect(config) as deps:

            def loaded(side: str, pace_s: float | None) -> Measure:
                async def one() -> Figures:
                    await _reset(svc.database_url, svc.redis_url, submits_only)
                    async with contextlib.AsyncExitStack() as stack:
                        if pace_s is not None:
                            await stack.enter_async_context(_sweeping(deps, passes, side, pace_s))
                        figures = await load("post", "--url", loaded_url, *timing, "--api-key", run.api_key)
                    return _figures(figures)

                return one

            async def idle() -> Figures:
                await _reset(idle_url, svc.redis_url, "TRUNCATE jobs CASCADE")
                return _figures(await load("post", "--url", idle_web, *timing, "--api-key", idle_key))

            sides: list[tuple[str, Measure]] = [
                ("paced", loaded("paced", PACE_S)), ("flat_out", loaded("flat_out", 0.0)),
                ("unswept", loaded("unswept", None)), ("idle", idle),
            ]  # fmt: skip
            for i in range(s.rounds):  # the order reverses every round, as bench/compare.py's alternate does
                figures: dict[str, Figures] = {}
                for name, side in sides if i % 2 == 0 else reversed(sides):
                    figures[name] = await side()
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in figures[name].items())
                    print(f"bench: round {i + 1}/{s.rounds} {name}: {shown}", file=sys.stderr, flush=True)
                paced.rounds.append((figures["paced"], figures["idle"]))
                flat_out.rounds.append((figures["flat_out"], figures["idle"]))
                unswept.rounds.append((figures["unswept"], figures["idle"]))
            await _reset(svc.database_url, svc.redis_url, submits_only)
            left_after_rounds = await conn.fetchval(_PAST_RETENTION, config.job_retention_s)
            print(f"bench: {left_after_rounds:,} jobs past retention left; sweeping on", file=sys.stderr, flush=True)
            # on alone until a pass finds nothing left to delete
            while await _pass(deps, passes, "alone"):
                pass
        left = await conn.fetchrow(_LEFT)
        assert left is not None
        paced.notes.update(_pass_notes(passes), left_after_rounds=left_after_rounds, **dict(left.items()))
        return [paced, flat_out, unswept]
    finally:
        await run.fleet.stop(LOADED)
        await run.fleet.stop(IDLE)
        await conn.close()
        await reset_outlast(run)


def _figures(figures: dict[str, Any]) -> Figures:
    if figures["errors"]:
        raise RuntimeError(f"{figures['errors']} submits answered other than 202")
    return {m.key: figures[m.key] for m in METRICS}


def _pass_notes(passes: Passes) -> dict[str, Any]:
    def by(side: str) -> list[float]:
        return [ms for ms, where in zip(passes.ms, passes.side, strict=True) if where == side]

    deleting = [n for n in passes.deleted if n]
    # the table as it shrank: jobs past retention left after every tenth of the passes
    left, curve = JOBS, []
    for n, deleted in enumerate(passes.deleted, 1):
        left -= deleted
        if n % max(1, len(passes.deleted) // 10) == 0 or n == len(passes.deleted):
            curve.append((n, left))
    sides = {
        f"pass_ms_{stat}_{side}": figure
        for side in ("paced", "flat_out", "alone")
        if (ms := by(side))
        for stat, figure in (("max", max(ms)), ("p99", _percentile(ms, 0.99)), ("p50", statistics.median(ms)))
    }
    return {
        "passes": len(passes.ms),
        "pass_ms_max": max(passes.ms),
        "pass_ms_p99": _percentile(passes.ms, 0.99),
        "pass_ms_p50": statistics.median(passes.ms),
        **{f"passes_{side}": len(by(side)) for side in ("paced", "flat_out", "alone")},
        **sides,
        "passes_over_goal": sum(ms > PASS_GOAL_MS for ms in passes.ms),
        "pass_goal_ms": PASS_GOAL_MS,
        "deleted_per_pass_median": statistics.median(deleting) if deleting else 0,
        "deleted_per_pass_max": max(passes.deleted),
        "deleted": sum(passes.deleted),
        "left_by_pass": curve,
    }
