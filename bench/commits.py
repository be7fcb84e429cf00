"""SQL commits per job with P progress reports over d seconds, against the bound 3 + min(P, 4·d).

Three commits carry any job (submit, claim, finish); each progress write is one more, and the worker writes
progress at most once per OUTLAST_PROGRESS_INTERVAL_S (0.25 s), so P reports over d seconds should cost at most
min(P, 4·d) more. For each (P, d), batches of jobs of the `progress` type (bench/progress_job.py) run on freshly
started web and worker processes, and `pg_stat_database.xact_commit` of the bench database is read before they
start and after they exit (a backend always reports its counts when it ends, so the count is exact).

A batch also pays for things no job causes: start-up, the sweep and the webhook poller for as long as it runs,
and the first use of each statement on each pooled connection (asyncpg prepares it: a Parse and a Sync, which
the server counts as a transaction of its own). So the figure per job is the difference between a batch of M
jobs and one of M/5 with the same (P, d), which lasts about as long: (commits(M) - commits(M/5)) / (4M/5).
The all-in count of the large batch, and the exact write transactions (from the transaction-id counter), are in
the record.

A count, not a timing: one pair of batches per (P, d), and the "baseline" is the bound itself, so the ratio is
commits ÷ bound and the goal is at most 1.
"""

from __future__ import annotations

import json

import asyncpg

from bench.compare import Comparison, Metric
from bench.noop_jobs import commits_per_job
from bench.run import Run

PROGRESS_INTERVAL_S = 0.25  # Outlast's default OUTLAST_PROGRESS_INTERVAL_S
# (P, d): no progress; fewer reports than the interval lets through; many more.
CASES = ((0, 0.0), (3, 2.0), (50, 2.0))


def bound(updates: int, seconds: float) -> float:
    return 3 + min(updates, seconds / PROGRESS_INTERVAL_S)


async def measure(run: Run) -> Comparison:
    metrics = [
        Metric(f"p{p}_d{d:g}", f"SQL commits/job, P={p} over {d:g} s", higher_is_better=False, goal=1.0)
        for p, d in CASES
    ]
    comparison = Comparison("commits", "3 + min(P, 4·d)", metrics)
    outlast: dict[str, float] = {}
    limit: dict[str, float] = {}
    admin = await asyncpg.connect(run.svc.admin_url)
    try:
        for (p, d), metric in zip(CASES, metrics, strict=True):
            body = json.dumps({"type": "progress", "input": {"updates": p, "seconds": d}})
            # Noops are quick: more of them, for a steadier figure. The others run 100 at a time per worker.
            many = run.settings.jobs if p == 0 else run.settings.progress_jobs
            few = many // 5
            # Both batches after the same warm-up: the first use of each statement on each pooled connection is a
            # transaction of its own, and a batch of M would otherwise reach more connections than one of M/5.
            large = await commits_per_job(run, admin, many, body, warm_up=many)
            small = await commits_per_job(run, admin, few, body, warm_up=many)
            per_job = (large["commits"] - small["commits"]) / (many - few)
            writes = (large["write_transactions"] - small["write_transactions"]) / (many - few)
            outlast[metric.key], limit[metric.key] = per_job, bound(p, d)
            comparison.notes[metric.key] = {
                "commits_per_job": per_job,
                "write_transactions_per_job": writes,
                "all_in_commits_per_job": large["commits_per_job"],
                "jobs": [many, few],
                "batches": {many: large, few: small},
            }
    finally:
        await admin.close()
    comparison.rounds.append((outlast, limit))
    return comparison
