"""PostgreSQL restarts (fast, and immediate: a crash as far as clients can tell) while clients submit and poll:
the web answers 503 + Retry-After, never 500; both processes recover without a restart; every job ends."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest

from tests.chaos.conftest import LEASE_S, Cluster, holds, lifecycle_problems
from tests.conftest import eventually

pytestmark = pytest.mark.slow

CLIENTS = 4
RESTARTS = 5
OUTAGE_S = LEASE_S + 1
SEED = 7


@dataclass(frozen=True)
class Answer:
    what: str
    at: float
    status: int  # 0: no HTTP answer at all
    retry_after: str | None
    problem: str | None


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart_answers_503_with_retry_after_never_500_and_every_job_ends(
    cluster: Cluster, figure: Callable[[str], None], mode: str
) -> None:
    web = cluster.start_web()
    workers = [cluster.start_worker(name) for name in ("w0", "w1")]
    await cluster.web_ready()
    await cluster.worker_ready("w0", "w1")
    postgres = cluster.stores.postgres

    answers: list[Answer] = []
    submitted: list[str] = []
    stop = asyncio.Event()

    async def record(what: str, request: Awaitable[httpx.Response]) -> httpx.Response | None:
        try:
            response = await request
        except httpx.HTTPError as exc:
            answers.append(Answer(what, time.time(), 0, None, repr(exc)))
            return None
        problem = response.json().get("type") if response.status_code >= 400 else None
        answers.append(Answer(what, time.time(), response.status_code, response.headers.get("retry-after"), problem))
        return response

    async def client(n: int) -> None:
        rng = random.Random(SEED + n)
        http = cluster.http
        for i in itertools.count():
            if stop.is_set():
                return
            body = {"type": "sleep", "input": {"seconds": rng.uniform(0.1, 1.0), "steps": 2}, "max_attempts": 20}
            response = await record("submit", http.post("/v1/jobs", json=body))
            if response is not None and response.status_code == 202:
                submitted.append(response.json()["id"])
            if submitted:
                job_id = rng.choice(submitted)
                headers = {"Prefer": "wait=1"} if i % 3 == 0 else {}
                await record("poll", http.get(f"/v1/jobs/{job_id}", headers=headers))
            await record("list", http.get("/v1/jobs", params={"limit": 5}))
            await asyncio.sleep(0.02)

    def count(since: float, predicate: Callable[[Answer], bool]) -> int:
        return sum(1 for a in answers if a.at >= since and predicate(a))

    clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    try:
        begin = time.time()
        await eventually(holds(lambda: count(begin, lambda a: a.status == 202) >= 10))
        down = time.time()
        await asyncio.to_thread(postgres.stop, mode)
        stopped = time.time()
        # The outage outlasts the lease (running attempts can't heartbeat meanwhile), and every kind of request
        # is answered 503 a few times.
        await eventually(holds(lambda: time.time() - stopped >= OUTAGE_S))
        for what in ("submit", "poll", "list"):
            await eventually(holds(lambda what=what: count(stopped, lambda a: a.what == what and a.status == 503) >= 5))
        up = time.time()
        await asyncio.to_thread(postgres.start)
        restarted = time.time()
        await eventually(
            holds(lambda: count(restarted, lambda a: a.what == "submit" and a.status == 202) >= 10), within=30
        )
        recovered = min(a.at for a in answers if a.at >= restarted and a.status == 202)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    rows = await cluster.all_done(len(await cluster.rows()), within=60)
    assert set(submitted) <= set(rows)
    statuses = Counter(r["status"] for r in rows.values())
    events = await cluster.events()
    assert not {job_id: p for job_id in rows if (p := lifecycle_problems(events[job_id]))}

    by_status = Counter(a.status for a in answers)
    failed = [a for a in answers if a.status >= 300 or a.status == 0]
    unavailable = [a for a in failed if a.status == 503]
    others = [a for a in failed if a.status != 503]
    assert all(a.problem == "/problems/unavailable" and int(a.retry_after or 0) >= 1 for a in unavailable)
    # Outside the outage (and its reconnects) everything succeeded.
    assert all(down <= a.at <= recovered + 5 for a in failed), [a for a in failed if a.at > recovered + 5]
    # Neither process was restarted: both reconnected on their own.
    assert web.poll() is None and all(w.poll() is None for w in workers)
    assert cluster.web is web and [cluster.workers[n] for n in ("w0", "w1")] == workers
    assert statuses["succeeded"] == len(rows), statuses  # retry-safe, with attempts to spare

    figure(
        f"stop('{mode}'): {len(answers)} requests from {CLIENTS} clients, {by_status[202] + by_status[200]} 2xx, "
        f"{by_status[503]} 503 (all with Retry-After and /problems/unavailable), {by_status[500]} 500, "
        f"{by_status[0]} connection errors; stop took {stopped - down:.1f}s, down {up - stopped:.1f}s, "
        f"start took {restarted - up:.1f}s, first 202 {recovered - restarted:.2f}s after start, "
        f"{count(restarted, lambda a: a.status == 503)} 503s after start; {len(rows)}/{len(rows)} jobs terminal "
        f"({dict(statuses)}), max attempt {max(r['attempt'] for r in rows.values())}; web and worker pids unchanged"
    )
    assert not others, Counter((a.what, a.status) for a in others)
    assert "Exception in ASGI application" not in cluster.log("web")


async def test_postgres_restarts_under_a_burst_of_reads_never_answer_500(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    """Fast restarts while 16 clients read as fast as they can. (Found by this suite: a query on a pooled connection
    that got the server's 'terminating connection' but not yet the socket close raised asyncpg's InternalClientError,
    which was not an unavailable database, so the web answered 500: with 16 readers, at the first restart.)"""
    cluster.start_web()
    await cluster.web_ready()
    await cluster.submit("sleep", {"seconds": 0})
    postgres = cluster.stores.postgres
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            try:
                statuses[(await cluster.http.get("/v1/jobs", params={"limit": 1})).status_code] += 1
            except httpx.TransportError:
                statuses[0] += 1  # the connection uvicorn closes after an unhandled exception

    readers = [asyncio.create_task(reader()) for _ in range(16)]
    restarts = 0
    try:
        while restarts < RESTARTS and not statuses[500]:
            await eventually(holds(lambda: statuses[200] >= 50))
            await asyncio.to_thread(postgres.stop, "fast")
            await asyncio.to_thread(postgres.start)
            restarts += 1
            statuses[200] = 0
    finally:
        stop.set()
        await asyncio.gather(*readers)
    figure(f"{restarts} fast restarts under 16 readers: {statuses[500]} answers 500, {statuses[503]} 503")
    assert statuses[500] == 0, cluster.log("web")[-3000:]
