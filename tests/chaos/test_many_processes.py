"""More than one of each: 2 web processes and 4 workers on one PostgreSQL and one Valkey run 5,000 jobs while
workers are SIGKILLed and restarted; every job ends once, no two attempts of one overlap, and what /v1/stats and
the metrics say agrees with the table."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.chaos.conftest import Cluster, holds, lifecycle_problems, overlapping_attempts
from tests.conftest import bearer, eventually, free_port

pytestmark = pytest.mark.slow

SEED = 20261203
JOBS = 5_000
BATCH = 500
KILLS = 8
MAX_ATTEMPTS = KILLS + 1  # a job loses at most one attempt per kill: every job must succeed
WORKERS = ("w0", "w1", "w2", "w3")
SLOTS = 100  # OUTLAST_WORKER_MAX_JOBS, the default


def scraped(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include these (a pid's too, in multiprocess mode)."""
    total = 0.0
    for line in text.splitlines():
        series, _, number = line.rpartition(" ")
        if line.startswith("#") or series.partition("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        total += float(number) if all(found.get(k) == v for k, v in labels.items()) else 0.0
    return total


@pytest.mark.timeout(300)
async def test_two_webs_and_four_killed_workers_run_5000_jobs_each_once_and_stats_and_metrics_agree(
    cluster: Cluster, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    rng = random.Random(SEED)
    shared = tmp_path / "worker-metrics"  # the four workers share one port and sum through these files
    shared.mkdir()
    metrics_port = free_port()
    cluster.env.update(PROMETHEUS_MULTIPROC_DIR=str(shared), OUTLAST_WORKER_METRICS_PORT=str(metrics_port))
    await cluster.start_supervised(*WORKERS)
    second_url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--no-access-log"]
    web_env = {k: v for k, v in cluster.env.items() if k not in ("PROMETHEUS_MULTIPROC_DIR",)}
    cluster._spawn("web2", argv, {**web_env, "PORT": second_url.rpartition(":")[2]})
    webs = [cluster.http, httpx.AsyncClient(base_url=second_url, timeout=60, headers=bearer(cluster.key))]
    try:
        await eventually(lambda: _ready(webs[1]), within=30)
        started = time.monotonic()
        ids: list[str] = []

        async def submitter() -> None:
            for n in range(JOBS // BATCH):  # the batches alternate between the two web processes
                body = {
                    "jobs": [
                        {
                            "type": "chaos_sleep",
                            "input": {"seconds": rng.uniform(0.0, 0.2)},
                            "max_attempts": MAX_ATTEMPTS,
                        }
                        for _ in range(BATCH)
                    ]
                }
                response = await webs[n % 2].post("/v1/jobs/batch", json=body)
                assert response.status_code == 202, response.text
                ids.extend(job["id"] for job in response.json()["items"])
                await asyncio.sleep(0.5)

        async def killer() -> None:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                cluster.signal(rng.choice(WORKERS), signal.SIGKILL)

        await asyncio.gather(submitter(), killer())
        rows = await cluster.all_done(JOBS, within=180)
        elapsed = time.monotonic() - started
        await eventually(holds(lambda: len(cluster.exits) == KILLS))

        # Each job ended once, succeeded, and its attempts never overlapped.
        assert sorted(rows) == sorted(ids)
        assert {r["status"] for r in rows.values()} == {"succeeded"}
        events = await cluster.events()
        problems = {job_id: p for job_id in ids if (p := lifecycle_problems(events[job_id]))}
        assert not problems, dict(list(problems.items())[:5])
        attempts = await cluster.attempts()
        assert not (overlaps := overlapping_attempts(ids, attempts, cluster.faults)), overlaps[:5]
        total_attempts = sum(r["attempt"] for r in rows.values())

        # /v1/stats, from either web process, agrees with the table.
        for web in webs:
            stats = (await web.get("/v1/stats")).json()
            assert (stats["queued"], stats["scheduled"], stats["running"]) == (0, 0, 0)
            assert stats["last_hour"]["succeeded"] == JOBS
            assert sorted(w["name"] for w in stats["workers"]) == sorted(WORKERS)
        # The web processes are scraped each on its own (two ports): their submits sum to the table's jobs.
        scrapes = [(await web.get("/metrics")).text for web in webs]
        assert sum(scraped(t, "outlast_jobs_submitted_total", type="chaos_sleep") for t in scrapes) == JOBS
        for text in scrapes:  # the queue's gauges are the table's, whichever process reads it
            assert scraped(text, "outlast_jobs", type="chaos_sleep", state="queued") == 0
            assert scraped(text, "outlast_jobs", type="chaos_sleep", state="running") == 0
        # The workers' shared port sums all of theirs, the killed ones' included, and never counts one twice. A kill
        # landing after a batch of finishes (or claims, or a sweep's rescues) committed and before they were counted
        # loses that batch's counts: at most a worker's slots per kill.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as http:
            worker_text = (await http.get("/metrics")).text
        lost = KILLS * SLOTS
        succeeded = scraped(worker_text, "outlast_jobs_finished_total", type="chaos_sleep", status="succeeded")
        counted_attempts = scraped(worker_text, "outlast_job_attempts_total", type="chaos_sleep")
        rescued = scraped(worker_text, "outlast_jobs_rescued_total")
        assert JOBS - lost <= succeeded <= JOBS, succeeded
        assert total_attempts - lost <= counted_attempts <= total_attempts, (counted_attempts, total_attempts)
        assert total_attempts - JOBS - lost <= rescued <= total_attempts - JOBS, (rescued, total_attempts - JOBS)
        figure(
            f"{JOBS}/{JOBS} succeeded in {elapsed:.1f}s on 2 web + 4 workers; {KILLS} SIGKILLs, {len(cluster.exits)} "
            f"restarts, {total_attempts - JOBS} rescued attempts; metrics: {succeeded:.0f} succeeded, "
            f"{counted_attempts:.0f} attempts (table {total_attempts}), {rescued:.0f} rescued"
        )
    finally:
        await webs[1].aclose()


async def _ready(client: httpx.AsyncClient) -> bool | None:
    try:
        return (await client.get("/readyz")).status_code == 200 or None
    except httpx.TransportError:
        return None
