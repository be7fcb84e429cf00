"""`python -m bench [--quick]`: every comparison, a table on stdout, the whole record under bench/results/.

About 10 to 14 minutes with the defaults, about 2 with --quick; `retention` adds about 4 (a million rows to load
and delete), `running --scale 10000` about 13 (docs/performance.md §11). `scaling` (1, 2 and 4 worker processes,
the scaling model's figures) runs only with `--only scaling`: about 4 minutes; `streams_running` (issue 20's S5,
10,000 streams following running jobs) only with `--only streams_running`: 1.5 minutes a round on a quiet machine,
most of it opening the streams, many more on a busy one. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench import (
    batch_submit,
    blob_stream,
    commits,
    dashboard,
    dashboard_feed,
    drain,
    get_job,
    latency,
    noop_jobs,
    report,
    retention,
    running,
    scaling,
    scheduling,
    submit_job,
    vectors,
    workflow,
)
from bench.compare import Comparison
from bench.procs import Fleet
from bench.run import Run, Settings, tuning
from bench.services import DATA, ROOT, Services, api_key, prepare, services
from bench.streams import measure as streams_running

# One line per measurement: a new one is a module with `measure(run) -> Comparison` (or a list of them, when
# one Outlast measurement per round serves several baselines), added here.
MEASUREMENTS: dict[str, Callable[[Run], Awaitable[Comparison | list[Comparison]]]] = {
    "submit_job": submit_job.measure,
    "get_job": get_job.measure,
    "noop_jobs": noop_jobs.measure,
    "latency": latency.measure,
    "drain": drain.measure,
    "drain_keyed": scheduling.measure,
    "batch_submit": batch_submit.measure,
    "commits": commits.measure,
    "workflow": workflow.measure,
    "retention": retention.measure,
    "vectors": vectors.measure,
    "blob_stream": blob_stream.measure,
    "running": running.measure,
    "idle": running.measure_idle,  # running's S7 alone, quickly: only when asked for (PART_OF)
    "dashboard": dashboard.measure,
    "dashboard_feed": dashboard_feed.measure,
    "scaling": scaling.measure,
    "streams_running": streams_running.measure,
}
# Run only when named with --only: longer than the default run can spare.
ON_REQUEST = ("scaling", "streams_running")
PART_OF = {"idle": "running"}  # a part of another measurement, to run alone: left out of a full run
FULL = Settings(
    rounds=5, duration_s=4.0, warmup_s=1.0, concurrency=32, jobs=1000, seed_jobs=3000,
    latency_samples=20, drain_jobs=2000, progress_jobs=200,
)  # fmt: skip
QUICK = Settings(
    rounds=3, duration_s=1.5, warmup_s=0.5, concurrency=32, jobs=300, seed_jobs=1000,
    latency_samples=10, drain_jobs=500, progress_jobs=50,
)  # fmt: skip
RESULTS = ROOT / "bench" / "results"


def _settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    return Settings(
        rounds=args.rounds or base.rounds,
        duration_s=args.duration or base.duration_s,
        warmup_s=base.warmup_s,
        concurrency=args.concurrency or base.concurrency,
        jobs=args.jobs or base.jobs,
        seed_jobs=base.seed_jobs,
        latency_samples=base.latency_samples,
        drain_jobs=base.drain_jobs,
        progress_jobs=base.progress_jobs,
        running_jobs=args.scale or 2_000,
    )


async def _run(
    svc: Services, settings: Settings, names: list[str], scratch: Path
) -> tuple[list[Comparison], dict[str, Any]]:
    fleet = Fleet(scratch)
    try:
        facts: dict[str, Any] = {"postgres": await prepare(svc)}
        redis = Redis.from_url(svc.redis_url)
        try:
            facts["valkey"] = (await redis.info("server")).get("valkey_version") or "redis"
        finally:
            await redis.aclose()
        run = Run(svc, fleet, settings, scratch, await api_key(svc))
        comparisons: list[Comparison] = []
        for name in names:
            started = time.monotonic()
            measured = await MEASUREMENTS[name](run)
            comparisons.extend(measured if isinstance(measured, list) else [measured])
            print(f"bench: {name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        return comparisons, facts
    finally:
        await fleet.stop_all()


def _commit_lines(comparisons: list[Comparison]) -> list[str]:
    lines = []
    notes = {c.name: c.notes for c in reversed(comparisons)}  # reversed: the first of a name wins, as next() did
    counted = notes.get("commits")
    if counted is not None and "p0_d0" in counted:
        noop = counted["p0_d0"]
        lines.append(
            f"Outlast SQL commits per noop job: {noop['all_in_commits_per_job']:.2f} all in (xact_commit delta /"
            f" {2 * noop['jobs'][0]} jobs, start-up, warm-up and sweep included),"
            f" {noop['commits_per_job']:.2f} per job added, of which write transactions:"
            f" {noop['write_transactions_per_job']:.2f}"
        )
    ceiling = notes.get("db_ceiling")
    if ceiling is not None:
        rate, writes = ceiling["db_commits_per_s"], ceiling["write_transactions_per_job"]
        lines.append(
            f"durable-commit ceiling: {rate:,.0f} commits/s here ({ceiling['db_probe_connections']} connections,"
            f" one-row INSERTs, median of rounds) / {writes:.2f} = {rate / writes:,.0f} jobs/s at most, however"
            " many workers"
        )
    flow = notes.get("workflow")
    if flow is not None:
        p50, goal = flow["fan_in_ms_p50"], flow["fan_in_goal_ms"]
        lines.append(
            f"workflow fan-in, last mapped job's finish to the fan-in's start: p50 {p50:.0f} ms, max"
            f" {flow['fan_in_ms_max']:.0f} ms (goal p50 <= {goal} ms: {'pass' if p50 <= goal else 'MISS'})"
        )
    kept = notes.get("retention")
    if kept is not None:
        worst, goal = kept["pass_ms_max"], kept["pass_goal_ms"]
        lines.append(
            f"retention over {kept['jobs']:,} jobs past it: {kept['passes']} sweep passes, max {worst:.0f} ms, p99"
            f" {kept['pass_ms_p99']:.0f} ms, {kept['deleted_per_pass_median']:.0f} jobs deleted a pass,"
            f" {kept['jobs_left']} jobs left (goal every pass <= {goal:.0f} ms: {'pass' if worst <= goal else 'MISS'})"
        )
    followed = notes.get("streams_running")
    if followed is not None:
        p99, goal = followed["outlast_p99_ms_median"], followed["p99_goal_ms"]
        lines.append(
            f"streams_running: {followed['streams']:,} streams on {followed['jobs']:,} running jobs, publish ->"
            f" received p99 {p99:.0f} ms (median of rounds; {min(followed['outlast_p99_ms']):.0f} to"
            f" {max(followed['outlast_p99_ms']):.0f}) (goal <= {goal:.0f} ms: {'pass' if p99 <= goal else 'MISS'})"
        )
    blob = notes.get("blob_stream")
    if blob is not None:
        worst, goal = max(blob["rss_growth_mb"]), blob["rss_goal_mb"]
        lines.append(
            f"blob_stream: the web's RSS grew {worst:.1f} MB at most while it streamed {blob['mb']} MB"
            f" (goal <= {goal:.0f} MB: {'pass' if worst <= goal else 'MISS'})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds: about two minutes")
    parser.add_argument("--only", action="append", choices=sorted(MEASUREMENTS), help="run only this comparison")
    parser.add_argument("--rounds", type=int, help="rounds per comparison (at least 3)")
    parser.add_argument("--duration", type=float, help="seconds of load per side per round")
    parser.add_argument("--jobs", type=int, help="noop jobs per batch")
    parser.add_argument("--concurrency", type=int, help="keep-alive connections / concurrent submitters")
    parser.add_argument("--scale", type=int, help="jobs running at once in `running` (2,000; the issue's 10,000)")
    args = parser.parse_args(argv)
    settings = _settings(args)
    if settings.rounds < 3:
        parser.error("--rounds must be at least 3: one round's ratio says nothing about its spread")
    names = args.only or [name for name in MEASUREMENTS if name not in PART_OF and name not in ON_REQUEST]

    started, stamp, load_before = time.monotonic(), datetime.now(UTC), os.getloadavg()
    if load_before[0] > (os.cpu_count() or 1) / 2:
        # Ratios absorb a steady neighbour, not a bursty one: a test suite next door moves them.
        print(f"bench: the machine is busy (load {load_before[0]:.1f}); expect noisy figures", file=sys.stderr)
    scratch = DATA / "run"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with services() as svc:
            comparisons, facts = asyncio.run(_run(svc, settings, names, scratch))
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    print(f"\nOutlast bench, {stamp:%Y-%m-%d %H:%M} UTC, {settings.rounds} rounds; ratio = Outlast / baseline")
    print(report.table(comparisons))
    met, goals = report.verdicts(comparisons)
    print(f"goals met (median ratio): {met} of {goals}")
    for line in _commit_lines(comparisons):
        print(line)
    record = {
        "date": stamp.isoformat(),
        "elapsed_s": round(elapsed, 1),
        "settings": settings.__dict__,
        "services": {"origin": svc.origin, **facts},
        "tuning": tuning(),
        "machine": {**report.machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "comparisons": [
            {"name": c.name, "baseline": c.baseline, "summary": c.summary(), "rounds": c.rounds, "notes": c.notes}
            for c in comparisons
        ],
    }
    path = RESULTS / f"bench-{stamp:%Y%m%dT%H%M%SZ}{'-quick' if args.quick else ''}.json"
    report.write(path, record)
    print(f"\n{elapsed:.0f} s; the full record: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
