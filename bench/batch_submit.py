"""Bulk submit: 1,000 jobs in one `POST /v1/jobs/batch` against the same 1,000 as single `POST /v1/jobs` on 32
keep-alive connections, both into one Outlast web process (no worker runs: only the submit is measured).

Each side's figure is accepted jobs/s from the first request sent until the last answer, from the load generator
(bench/load.py `burst`), the median of BURSTS bursts; before each burst the jobs table is emptied and Outlast's
Redis flushed. The goal (issue 15): the batch takes jobs at least 5x as fast, which is what one transaction and one
doorbell round trip for a thousand jobs, instead of a thousand of each, should buy.
"""

from __future__ import annotations

from bench.compare import Comparison, Figures, Measure, Metric, alternate
from bench.noop_jobs import reset_outlast
from bench.procs import load
from bench.run import Run, outlast_env

WEB = "batch-outlast-web"  # the process's name, and its log's
JOBS = 1000  # the batch route's default cap (OUTLAST_MAX_BATCH_JOBS)
WARMUP_JOBS = 200  # submitted and thrown away before each side, so neither pays for a cold process
# A side's figure is the median of this many bursts: one burst of the batch lasts under 100 ms, where one hiccup of
# this shared machine moves the figure by half
BURSTS = 5
METRICS = [Metric("jobs_per_s", "bulk submit of 1,000 jobs/s", higher_is_better=True, goal=5.0)]


async def measure(run: Run) -> Comparison:
    concurrency = str(run.settings.concurrency)
    try:
        url = await run.fleet.outlast(WEB, outlast_env(run.svc))

        def side(batch: int) -> Measure:
            async def one() -> Figures:
                args = ["--url", url, "--concurrency", concurrency, "--api-key", run.api_key, "--batch", str(batch)]
                await load("burst", *args, "--jobs", str(WARMUP_JOBS if batch == 1 else batch))
                bursts = []
                for _ in range(BURSTS):
                    await reset_outlast(run)
                    bursts.append(await load("burst", *args, "--jobs", str(JOBS)))
                figures = sorted(bursts, key=lambda f: float(f["jobs_per_s"]))[BURSTS // 2]
                return {"jobs_per_s": figures["jobs_per_s"], "elapsed_s": figures["elapsed_s"]}

            return one

        comparison = Comparison("batch_submit", f"{JOBS} single POST /v1/jobs on {concurrency} connections", METRICS)
        comparison.notes.update(jobs=JOBS, concurrency=run.settings.concurrency)
        return await alternate(comparison, side(JOBS), side(1), run.settings.rounds)
    finally:
        await run.fleet.stop(WEB)
        await reset_outlast(run)
