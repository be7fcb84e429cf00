"""`python -m bench --only streams_running`: issue 20's S5 in the main bench, on the bench's services.

bench/streams' `running` measurement (10,000 streams following 1,000 running jobs that each report every second,
written as a worker's pulse writes them), Outlast's web process against the bare sse-starlette app fed by one
Redis subscription, in the bench's alternating rounds. The goals: the web's CPU per delivered event at most 1.3x
the bare app's, and Outlast's p99 publish -> received at most 250 ms (an absolute goal: a note, printed by
bench/__main__.py). Not in the default set: about 2 minutes a round here (most of it opening the streams).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from typing import Any

from bench.compare import Comparison, Figures, Metric, alternate
from bench.run import Run, baseline_env, outlast_env
from bench.streams.measurements import RUNNING_P99_MS, running
from bench.streams.sides import DATA, Bare, Outlast, Settings, raise_open_files
from worker import Config, connect

METRICS = [
    Metric("cpu_us_per_delivery", "web CPU µs per delivered report, 10,000 streams", higher_is_better=False, goal=1.3),
    Metric("p99_ms", "report publish -> received p99 ms, 10,000 streams", higher_is_better=False),
]
BASELINE = "bare sse-starlette app, one Redis subscription"


def _log(line: str) -> None:
    print(f"bench: streams_running{line}", file=sys.stderr, flush=True)


async def measure(run: Run) -> Comparison:
    settings = replace(Settings(), rounds=run.settings.rounds)
    raise_open_files(settings.running_streams + 1_000)
    (DATA / "logs").mkdir(parents=True, exist_ok=True)
    comparison = Comparison("streams_running", BASELINE, METRICS)
    comparison.notes.update(
        jobs=settings.running_jobs, streams=settings.running_streams, window_s=settings.running_s,
        report_s=settings.report_s, tick_s=settings.tick_s, p99_goal_ms=RUNNING_P99_MS,
    )  # fmt: skip
    config = Config(database_url=run.svc.database_url, redis_url=run.svc.redis_url)
    details: dict[str, list[dict[str, Any]]] = {"outlast": [], "bare": []}
    async with connect(config) as deps:
        outlast = Outlast(deps, outlast_env(run.svc), config)
        bare = Bare(deps, baseline_env(run.svc) | {"REDIS_URL": run.svc.redis_url})

        async def side(which: Outlast | Bare) -> Figures:
            result = await running(which, settings, _log)
            details[which.name].append(result)
            return {k: float(result[k]) for k in ("cpu_us_per_delivery", "p99_ms", "p50_ms", "max_ms", "missing")}

        await alternate(comparison, lambda: side(outlast), lambda: side(bare), settings.rounds)
        await deps.db.execute("TRUNCATE jobs CASCADE")
    comparison.notes["runs"] = details
    comparison.notes["outlast_p99_ms"] = [r["p99_ms"] for r in details["outlast"]]
    comparison.notes["outlast_p99_ms_median"] = statistics.median(comparison.notes["outlast_p99_ms"])
    return comparison
