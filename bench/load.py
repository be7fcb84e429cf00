"""The load generator: a second process, so the client's CPU is not the server's.

`python -m bench.load get|post|burst|submit|arq|latency|latency-arq|commits …` does one measurement and prints one
JSON line. It times itself, so the cost of starting Python is never part of a figure. The HTTP client is raw
asyncio on keep-alive connections with httptools parsing the answers: httpx would spend more CPU per request
than the servers measured here, on a machine where the client shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httptools
import uvloop
from arq.connections import RedisSettings, create_pool
from redis.asyncio import Redis

POLL_S = 0.02  # how often "is everything done?" is asked: the resolution of the end-to-end figures
LATENCY_POLL_S = 0.01  # how often one job is looked at; its timestamps, not this, make the figure
STALL_S = 30.0  # a batch with no job done for this long is broken, not slow


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self.keep_body = False  # set it to read `body` after each request; off, the body is dropped unread
        self.body = b""

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is one in all but its class

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def on_body(self, chunk: bytes) -> None:
        if self.keep_body:
            self.body += chunk

    def on_message_complete(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def request(self, raw: bytes) -> int:
        """Send one complete request; the answer's status code (its body is read and dropped)."""
        assert self._transport is not None
        self.body = b""
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _hammer(
    url: str, pick: Callable[[str], bytes], ok: int, concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """Send `pick(host)` requests on every connection for warmup + duration seconds; only requests that end
    inside the duration count."""
    host, port = _host_port(url)
    conns = [await Connection.open(host, port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = served = 0
    start = time.perf_counter() + warmup_s
    end = start + duration_s

    async def client(conn: Connection) -> None:
        nonlocal errors, served
        while (sent := time.perf_counter()) < end:
            status = await conn.request(pick(host))
            done = time.perf_counter()
            served += 1
            if start <= sent and done < end:
                latencies.append(done - sent)
                errors += status != ok

    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "served": served,  # warm-up included: what the server's CPU time is divided by
        "errors": errors,
        "rps": len(latencies) / duration_s,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
    }


def _auth(api_key: str) -> str:
    """The header every request carries (the baselines ignore it, and parse it as cheaply as any other)."""
    return f"Authorization: Bearer {api_key}\r\n" if api_key else ""


async def get(
    url: str, ids: list[str], concurrency: int, warmup_s: float, duration_s: float, api_key: str = ""
) -> dict[str, Any]:
    """GET /v1/jobs/{id} with random ids."""
    host, _ = _host_port(url)
    requests = [f"GET /v1/jobs/{i} HTTP/1.1\r\nHost: {host}\r\n{_auth(api_key)}\r\n".encode() for i in ids]
    return await _hammer(url, lambda _: random.choice(requests), 200, concurrency, warmup_s, duration_s)


async def paths(
    url: str,
    paths: list[str],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    api_key: str = "",
    cookie: str = "",
) -> dict[str, Any]:
    """GET random paths of a list (a page of the dashboard with its session cookie, an API list)."""
    host, _ = _host_port(url)
    extra = _auth(api_key) + (f"Cookie: {cookie}\r\n" if cookie else "")
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode() for p in paths]
    return await _hammer(url, lambda _: random.choice(requests), 200, concurrency, warmup_s, duration_s)


def _post(host: str, body: bytes, api_key: str = "", path: str = "/v1/jobs") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return f"{head}\r\n{_auth(api_key)}\r\n".encode() + body


NOOP = b'{"type":"noop","input":{}}'


async def post(url: str, concurrency: int, warmup_s: float, duration_s: float, api_key: str = "") -> dict[str, Any]:
    """POST /v1/jobs noop submits (nothing runs them): accepted/s and latency; anything but 202 is an error."""
    raw = _post(_host_port(url)[0], NOOP, api_key)
    return await _hammer(url, lambda _: raw, 202, concurrency, warmup_s, duration_s)


async def burst(url: str, jobs: int, batch: int, concurrency: int, api_key: str = "") -> dict[str, Any]:
    """`jobs` noop submits, as single `POST /v1/jobs` (batch 1) or as `POST /v1/jobs/batch` of `batch` jobs each,
    on up to `concurrency` connections: accepted jobs/s, from the first request sent to the last answer."""
    if jobs % batch:
        raise SystemExit(f"--jobs {jobs} is not a whole number of batches of {batch}")
    host, port = _host_port(url)
    if batch == 1:
        raw = _post(host, NOOP, api_key)
    else:
        raw = _post(host, b'{"jobs":[' + b",".join([NOOP] * batch) + b"]}", api_key, "/v1/jobs/batch")
    requests = jobs // batch
    conns = [await Connection.open(host, port) for _ in range(min(concurrency, requests))]
    refused = 0

    def lane(conn: Connection) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            nonlocal refused
            refused += await conn.request(raw) != 202

        return one

    try:
        t0 = time.perf_counter()
        await _spread(requests, [lane(c) for c in conns])
        elapsed = time.perf_counter() - t0
    finally:
        for conn in conns:
            conn.close()
    if refused:
        raise SystemExit(f"{refused} of {requests} requests answered other than 202")
    return {"jobs_per_s": jobs / elapsed, "elapsed_s": elapsed, "requests": requests}


async def _until_done(done: Callable[[], Awaitable[int]], jobs: int, feeding: asyncio.Future[None]) -> int:
    """Poll `done` (how many jobs are done) every POLL_S while `feeding` submits, until all `jobs` are.

    The number of polls, each one query. A worker that fails every job shows as no progress: say so soon.
    """
    polls, finished, progressed = 0, -1, time.monotonic()
    while True:
        if feeding.done() and feeding.exception() is not None:
            feeding.result()  # a submit that raised: stop now rather than wait
        polls += 1
        if (now_done := await done()) >= jobs:
            return polls
        if now_done != finished:
            finished, progressed = now_done, time.monotonic()
        elif time.monotonic() - progressed > STALL_S:
            raise SystemExit(f"stalled at {finished} of {jobs} jobs done for {STALL_S:.0f}s; see the worker's log")
        await asyncio.sleep(POLL_S)


async def _spread(jobs: int, lanes: list[Callable[[], Awaitable[None]]]) -> None:
    """Call the lanes `jobs` times in all, each lane one call at a time, all lanes at once."""
    left = jobs

    async def run(one: Callable[[], Awaitable[None]]) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(run(one) for one in lanes))


async def outlast_batch(
    url: str,
    database_url: str,
    jobs: int,
    concurrency: int,
    table: str = "jobs",
    body: bytes = NOOP,
    api_key: str = "",
    done: str = "table",
    redis_url: str = "",
) -> dict[str, Any]:
    """POST `jobs` jobs; seconds from the first POST until all are done.

    Done is what each side's own record says, read every POLL_S: `table` (Outlast, and the baselines that keep a
    status row, procrastinate's included) counts its `succeeded` rows; `arq` counts the result keys of the ids the
    202s carried (no database: S6's bare arq); `saq` counts the accepted jobs no longer in SAQ's incomplete set.
    """
    raw = _post(_host_port(url)[0], body, api_key)
    conns = [await Connection.open(*_host_port(url)) for _ in range(concurrency)]
    refused = accepted = 0
    submitted_at: float | None = None
    result_keys: list[str] = []
    for conn in conns:
        conn.keep_body = done == "arq"

    def lane(conn: Connection) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            nonlocal refused, accepted, submitted_at
            refused += await conn.request(raw) != 202
            if done == "arq":
                result_keys.append(f"arq:result:{json.loads(conn.body)['id']}")
            accepted += 1
            if accepted == jobs:
                submitted_at = time.perf_counter() - t0

        return one

    counted, close = await _done_counter(done, database_url, table, redis_url, result_keys, lambda: accepted)

    async def succeeded() -> int:
        if refused:
            raise SystemExit(f"{refused} submits refused")
        return await counted()

    try:
        t0 = time.perf_counter()
        submitting = asyncio.ensure_future(_spread(jobs, [lane(c) for c in conns]))
        polls = await _until_done(succeeded, jobs, submitting)
        elapsed = time.perf_counter() - t0
        await submitting
        assert submitted_at is not None  # every lane has returned
    finally:
        await close()
        for conn in conns:
            conn.close()
    return {"elapsed_s": elapsed, "submitted_s": submitted_at, "jobs_per_s": jobs / elapsed, "polls": polls}


SAQ_INCOMPLETE = "saq:default:incomplete"  # bench/baselines/saq_app.py's INCOMPLETE_KEY (not imported: saq)


async def _done_counter(
    done: str, database_url: str, table: str, redis_url: str, result_keys: list[str], accepted: Callable[[], int]
) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]:
    """How many jobs are done, by the record `done` names (see `outlast_batch`), and how to let go of it."""
    if done == "table":
        db = await asyncpg.connect(database_url)

        async def rows() -> int:
            row = await db.fetchrow(
                "SELECT count(*) FILTER (WHERE status::text = 'succeeded'), count(*) FILTER (WHERE status::text"
                f" IN ('failed', 'cancelled', 'expired', 'aborted')) FROM {table}"
            )
            assert row is not None
            ok, ended = row
            if ended:
                raise SystemExit(f"{ended} jobs ended other than succeeded")
            return int(ok)

        return rows, db.close
    redis = Redis.from_url(redis_url)

    async def results() -> int:
        return int(await redis.exists(*result_keys)) if result_keys else 0

    async def finished() -> int:
        now = accepted()  # first: a job accepted after it is still in the set, or already counted here
        return now - int(await redis.zcard(SAQ_INCOMPLETE))

    return (results if done == "arq" else finished), redis.aclose


async def arq_batch(redis_url: str, jobs: int, concurrency: int) -> dict[str, Any]:
    """enqueue_job `jobs` noops (arq's defaults: pickle); seconds from the first enqueue until every result exists."""
    redis = await create_pool(RedisSettings.from_dsn(redis_url))
    keys: list[str] = []

    async def one() -> None:
        job = await redis.enqueue_job("noop")
        assert job is not None  # None only for a duplicate job id, and arq picks fresh ones
        keys.append(f"arq:result:{job.job_id}")

    async def results() -> int:
        return int(await redis.exists(*keys)) if keys else 0

    try:
        t0 = time.perf_counter()
        enqueuing = asyncio.ensure_future(_spread(jobs, [one] * concurrency))
        polls = await _until_done(results, jobs, enqueuing)
        elapsed = time.perf_counter() - t0
        await enqueuing
    finally:
        await redis.aclose()
    return {"elapsed_s": elapsed, "jobs_per_s": jobs / elapsed, "polls": polls}


async def commits(database_url: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    """The database's own ceiling: one-row INSERT commits per second from `concurrency` connections."""
    conns = [await asyncpg.connect(database_url) for _ in range(concurrency)]
    await conns[0].execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (id bigserial PRIMARY KEY, at timestamptz)")
    done = 0
    end = time.perf_counter() + duration_s

    async def lane(conn: asyncpg.Connection) -> None:
        nonlocal done
        while time.perf_counter() < end:
            await conn.execute("INSERT INTO bench_commit_probe (at) VALUES (now())")
            done += 1

    try:
        await asyncio.gather(*(lane(c) for c in conns))
        await conns[0].execute("DROP TABLE bench_commit_probe")
    finally:
        for conn in conns:
            await conn.close()
    return {"commits_per_s": done / duration_s, "concurrency": concurrency}


async def _latencies(samples: int, gap_s: float, one: Callable[[], Awaitable[float]]) -> dict[str, Any]:
    """`samples` jobs one at a time on an idle system, each after a random pause of up to `gap_s`, so submits
    land at random points of the worker's poll cycle rather than just after its last poll."""
    seconds = []
    for _ in range(samples):
        await asyncio.sleep(random.uniform(0, gap_s))
        seconds.append(await one())
    seconds.sort()
    return {
        "samples": samples,
        "p50_ms": 1000 * _percentile(seconds, 0.50),
        "p99_ms": 1000 * _percentile(seconds, 0.99),
    }


async def latency(url: str, database_url: str, samples: int, gap_s: float, api_key: str = "") -> dict[str, Any]:
    """Seconds from sending `POST /v1/jobs` until the row is `running` (its `started_at`, by the database
    clock, which is this machine's); each job is left to finish before the next is sent."""
    conn = await Connection.open(*_host_port(url))
    conn.keep_body = True
    raw = _post(_host_port(url)[0], NOOP, api_key)
    db = await asyncpg.connect(database_url)

    async def one() -> float:
        sent = time.time()
        if (status := await conn.request(raw)) != 202:
            raise SystemExit(f"POST /v1/jobs answered {status}")
        job_id = UUID(json.loads(conn.body)["id"])
        while True:
            row = await db.fetchrow("SELECT status, started_at FROM jobs WHERE id = $1", job_id)
            if row is not None and row["status"] == "succeeded":
                return float(row["started_at"].timestamp() - sent)
            await asyncio.sleep(LATENCY_POLL_S)

    try:
        return await _latencies(samples, gap_s, one)
    finally:
        conn.close()
        await db.close()


async def latency_arq(redis_url: str, samples: int, gap_s: float) -> dict[str, Any]:
    """Seconds from `enqueue_job` until arq starts the job (its result's `start_time`)."""
    redis = await create_pool(RedisSettings.from_dsn(redis_url))

    async def one() -> float:
        sent = time.time()
        job = await redis.enqueue_job("noop")
        assert job is not None
        while True:
            if (info := await job.result_info()) is not None:
                return info.start_time.timestamp() - sent
            await asyncio.sleep(LATENCY_POLL_S)

    try:
        return await _latencies(samples, gap_s, one)
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    timed = argparse.ArgumentParser(add_help=False)  # a fixed time of load on keep-alive connections
    timed.add_argument("--url", required=True)
    timed.add_argument("--concurrency", type=int, default=32)
    timed.add_argument("--warmup", type=float, default=1.0)
    timed.add_argument("--duration", type=float, default=5.0)
    timed.add_argument("--api-key", default="", help="sent as `Authorization: Bearer`")
    p = sub.add_parser("get", parents=[timed], help="GET /v1/jobs/{id} with random ids")
    p.add_argument("--ids", required=True, help="a file of job ids, one a line")
    p = sub.add_parser("paths", parents=[timed], help="GET random paths of a file, one a line")
    p.add_argument("--paths", required=True, help="a file of paths, one a line")
    p.add_argument("--cookie", default="", help="sent as `Cookie` (a dashboard session)")
    sub.add_parser("post", parents=[timed], help="POST /v1/jobs noop submits for a fixed time")
    p = sub.add_parser("submit", help="jobs through an HTTP API, until its status table says all succeeded")
    p.add_argument("--url", required=True)
    p.add_argument("--database-url", default="")
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--table", default="jobs", help="where the status rows are: jobs, or a baseline's table")
    p.add_argument("--done", choices=("table", "arq", "saq"), default="table", help="what says a job is done")
    p.add_argument("--redis-url", default="", help="the Redis of --done arq or saq")
    p.add_argument("--body", default=NOOP.decode(), help="the JSON submitted for each job")
    p.add_argument("--api-key", default="", help="sent as `Authorization: Bearer`")
    p = sub.add_parser("burst", help="a fixed number of noop submits, single or batched, as fast as taken")
    p.add_argument("--url", required=True)
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--batch", type=int, default=1, help="jobs per request: 1 is POST /v1/jobs, more the batch route")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--api-key", default="", help="sent as `Authorization: Bearer`")
    p = sub.add_parser("arq", help="noop jobs enqueued on a bare arq, until all results exist")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p = sub.add_parser("latency", help="idle submit-to-running latency through Outlast's API")
    p.add_argument("--url", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--gap", type=float, default=0.5)
    p.add_argument("--api-key", default="", help="sent as `Authorization: Bearer`")
    p = sub.add_parser("latency-arq", help="idle enqueue-to-start latency of a bare arq")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--gap", type=float, default=0.5)
    p = sub.add_parser("commits", help="the database's commit rate")
    p.add_argument("--database-url", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)

    coro: Coroutine[Any, Any, dict[str, Any]]
    if args.command == "get":
        with open(args.ids) as f:
            ids = f.read().split()
        coro = get(args.url, ids, args.concurrency, args.warmup, args.duration, args.api_key)
    elif args.command == "paths":
        with open(args.paths) as f:
            wanted = f.read().split()
        coro = paths(args.url, wanted, args.concurrency, args.warmup, args.duration, args.api_key, args.cookie)
    elif args.command == "post":
        coro = post(args.url, args.concurrency, args.warmup, args.duration, args.api_key)
    elif args.command == "submit":
        body = args.body.encode()
        coro = outlast_batch(
            args.url, args.database_url, args.jobs, args.concurrency, args.table, body, args.api_key, args.done,
            args.redis_url,
        )  # fmt: skip
    elif args.command == "burst":
        coro = burst(args.url, args.jobs, args.batch, args.concurrency, args.api_key)
    elif args.command == "arq":
        coro = arq_batch(args.redis_url, args.jobs, args.concurrency)
    elif args.command == "latency":
        coro = latency(args.url, args.database_url, args.samples, args.gap, args.api_key)
    elif args.command == "latency-arq":
        coro = latency_arq(args.redis_url, args.samples, args.gap)
    else:
        coro = commits(args.database_url, args.concurrency, args.duration)
    print(json.dumps(uvloop.run(coro)), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
