"""What 50 dashboards following the live feed cost the web process under the end-to-end noop load (issue 18).

The same noop load as bench/noop_jobs.py (N submits over HTTP to one web process, one worker runs them, until the
jobs table says all succeeded), measured as the web process's CPU per job from /proc, in alternating rounds: with
50 followers of the tenant feed, and with none. The goal: at most 1.10x.

A follower is what a dashboard tab's EventSource is, without the browser: signed in at /ui/login with a key of its
own (one stream per browser, as 50 people would be; no key's stream limit raised), it reads the stream the jobs
list's first page opens with its session cookie, `GET /ui/events?rows=…` (no rows: each round starts with an empty
table, so every job of the round is one the page counts as new), and reads every byte as it comes. 50 real browsers
can't run on this machine; 50 connections reading the stream a page reads is the web's whole part of it (a page's
script and rendering are the browser's CPU, not the web's). Each follower connects before the round's CPU is read
and leaves after, so the figure is the following, not the signing in.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
from databases import Database

from bench.compare import Comparison, Figures, Metric, alternate
from bench.dashboard import session_cookie
from bench.noop_jobs import reset_outlast
from bench.procs import load
from bench.run import Run, outlast_env
from worker import keys
from worker.connections import QUEUE

FOLLOWERS = 50
WEB, WORKER = "feed-outlast-web", "feed-outlast-worker"  # the processes, and their logs' names
CONNECT_S = 30.0
# After the last job succeeded, before the CPU is read: the dashboard's stream sends at most every second
# (server/feed.py's DASHBOARD_GAP_S), after a read of the feed.
SETTLE_S = 1.5
METRICS = [
    Metric("web_cpu_ms_per_job", "web CPU ms per noop job, 50 feed followers", higher_is_better=False, goal=1.10),
    Metric("jobs_per_s", "noop jobs/s, 50 feed followers", higher_is_better=True),
    Metric("worker_cpu_ms_per_job", "worker CPU ms per noop job, 50 feed followers", higher_is_better=False),
]
BASELINE = "the same noop load, no one following"


class Follower:
    """One dashboard's EventSource on /ui/events: it counts the `job` events it read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.bytes = 0
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, cookie: str) -> Follower:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        path = "/ui/events?rows="  # the jobs list's, with no rows yet, as app.js opens it
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
            .encode()
        )  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            writer.close()
            raise RuntimeError(f"GET /ui/events answered {head.decode(errors='replace')}")
        follower = cls(reader, writer)
        follower.task = asyncio.create_task(follower._read())
        return follower

    async def _read(self) -> None:
        while chunk := await self.reader.read(65536):
            self.bytes += len(chunk)

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self.task
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def following(url: str, cookies: list[str]) -> AsyncIterator[list[Follower]]:
    """Every cookie's follower connected and answered 200 (the feed's first `id:` line follows at once)."""
    followers: list[Follower] = []
    try:
        async with asyncio.timeout(CONNECT_S):
            for cookie in cookies:
                followers.append(await Follower.open(url, cookie))
        yield followers
    finally:
        await asyncio.gather(*(f.close() for f in followers))


async def sessions(run: Run, url: str, n: int) -> list[str]:
    """`n` keys of tenant `default`, each signed in once: the session cookies of `n` browsers."""
    db = Database(run.svc.database_url)
    await db.connect()
    try:
        made = [await keys.create(db, "default", f"dashboard {i}") for i in range(n)]
    finally:
        await db.disconnect()
    return [await session_cookie(url, key) for key in made]


async def _truncate(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE jobs CASCADE")
        await conn.execute("TRUNCATE tenant_events")
    finally:
        await conn.close()


async def measure(run: Run) -> list[Comparison]:
    s = run.settings
    comparison = Comparison("dashboard_feed", BASELINE, METRICS)
    comparison.notes.update(jobs=s.jobs, concurrency=s.concurrency, followers=FOLLOWERS, path="/ui/events")
    await reset_outlast(run)
    env = outlast_env(run.svc)
    worker = run.fleet.worker(WORKER, "worker.settings.WorkerSettings", env, run.svc.redis_url, QUEUE)
    url, _ = await asyncio.gather(run.fleet.outlast(WEB, env), worker)
    bytes_per_job: list[float] = []
    try:
        cookies = await sessions(run, url, FOLLOWERS)

        async def batch(n: int) -> Figures:
            await _truncate(run.svc.database_url)
            web0, worker0 = run.fleet.cpu_s(WEB), run.fleet.cpu_s(WORKER)
            args = ["--database-url", run.svc.database_url, "--jobs", str(n), "--concurrency", str(s.concurrency)]
            figures = await load("submit", "--url", url, *args, "--api-key", run.api_key)
            await asyncio.sleep(SETTLE_S)  # the feed's last reads of the batch, on both sides alike
            return {
                "jobs_per_s": figures["jobs_per_s"],
                "web_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(WEB) - web0) / n,
                "worker_cpu_ms_per_job": 1000 * (run.fleet.cpu_s(WORKER) - worker0) / n,
            }

        async def followed(n: int = s.jobs) -> Figures:
            async with following(url, cookies) as followers:
                figures = await batch(n)
            figures["bytes_per_job"] = statistics.median(f.bytes for f in followers) / n
            bytes_per_job.append(figures["bytes_per_job"])
            return figures

        async def alone(n: int = s.jobs) -> Figures:
            return await batch(n)

        warm = max(1, s.jobs // 4)  # pools fill and code paths warm on both sides before anything is timed
        await followed(warm)
        await alone(warm)
        bytes_per_job.clear()
        await alternate(comparison, followed, alone, s.rounds)
        comparison.notes["bytes_per_job_per_follower"] = bytes_per_job  # what each stream was sent, per job
    finally:
        await run.fleet.stop(WEB)
        await run.fleet.stop(WORKER)
    return [comparison]
