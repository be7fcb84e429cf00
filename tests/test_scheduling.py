"""When and how much: run_at / delay_s, priority with aging, fairness among tenants, concurrency keys. Against a real
PostgreSQL and Redis, with in-process arq workers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import msgspec
import pytest
from arq.worker import Worker
from uuid_utils.compat import uuid7

from tests import engine
from tests.conftest import eventually, open_app, redis_settings
from worker import Config, Deps, Rate, claim, keys, store, sweep
from worker.capacity import Capacity, ensure_buckets, wake_keys
from worker.claim import EARLY_S, Claimed
from worker.connections import QUEUE
from worker.job_types import load
from worker.options import worker_options
from worker.queue import Bell, enqueue_many, message
from worker.run import TURNED_AWAY, Runtime, after_job_end

OWNER = "test-owner"
KEYED = Capacity("test", 10, 0.5, limits={"keyed": 2})


async def claim_keyed(deps: Deps, wanted: list[tuple[UUID, int]], capacity: Capacity) -> list[Claimed | Bell | None]:
    return await claim.claim_many(deps.jobs, wanted, owner=OWNER, lease_s=30, capacity=capacity)


def new_job(type: str = "sleep_once", *, tenant: str = "default", **fields: Any) -> store.NewJob:
    return store.NewJob(
        id=uuid7(), tenant=tenant, type=type, input=b'{"seconds": 0}', max_attempts=3, timeout_s=60,
        retry_safe=True, callback_url=None, metadata=b"{}", ttl_s=3600, **fields,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def working(deps: Deps, *, max_jobs: int, config: Config | None = None) -> AsyncIterator[None]:
    """An in-process arq worker that keeps polling (not burst) while the block runs, with its sweep, as a worker
    process has: a wake that raced a claim's turning away is the sweep's to catch."""
    config = config or deps.config
    deps = dataclasses.replace(deps, config=config)  # one config for the worker's claims and its sweep alike
    options = worker_options(config)
    options.update(
        handle_signals=False,
        poll_delay=0.01,
        max_jobs=max_jobs,
        redis_settings=redis_settings(config),
        on_startup=None,
        on_shutdown=None,
        ctx={"deps": deps, "runtime": (runtime := Runtime.of(deps, load(config.job_modules)))},
    )
    worker = Worker(**options)
    task = asyncio.create_task(worker.main())
    try:
        async with sweep.sweeping(deps, runtime.capacity):
            yield
    finally:
        # The cancel may catch arq's poll loop inside a Redis pipeline, which is then dropped unclosed: whenever the
        # collector finds it during this teardown, that is this teardown's doing, not a ResourceWarning to fail on;
        # and it is collected here, not in whichever test runs next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            task.cancel()  # the poll loop first: it may be starting jobs from a list it read before
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)  # what started, finishes
            await worker.close()
            gc.collect()


async def started_order(deps: Deps, ids: list[UUID]) -> list[UUID]:
    rows = await deps.db.fetch_all(
        "SELECT id FROM jobs WHERE id = ANY(:ids) AND started_at IS NOT NULL ORDER BY started_at, id", {"ids": ids}
    )
    return [r["id"] for r in rows]


async def all_done(deps: Deps, ids: list[UUID]) -> bool | None:
    query = "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = 'succeeded'"
    return await deps.db.fetch_val(query, {"ids": ids}) == len(ids) or None


def sleeps(n: int, seconds: float = 0.0, **fields: Any) -> list[dict[str, Any]]:
    return [{"type": "sleep_once", "input": {"seconds": seconds}, **fields} for _ in range(n)]


# -- run_at and delay_s -------------------------------------------------------------------------------


async def test_a_delayed_job_waits_queued_showing_run_at_and_starts_once_due(
    client: httpx.AsyncClient, deps: Deps, drain: Callable[[], Any]
) -> None:
    response = await client.post("/v1/jobs", json={**sleeps(1)[0], "delay_s": 1.5})
    assert response.status_code == 202
    job = response.json()
    run_at = datetime.fromisoformat(job["run_at"])
    assert job["status"] == "queued" and run_at > datetime.fromisoformat(job["created_at"])
    await drain()  # a burst worker waits for deferred messages too
    done = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert done["status"] == "succeeded" and done["run_at"] == job["run_at"]
    assert datetime.fromisoformat(done["started_at"]) >= run_at - timedelta(seconds=EARLY_S)


async def test_a_bell_rung_before_run_at_is_turned_away_and_the_sweep_rings_it_once_due(deps: Deps) -> None:
    job = new_job(run_at=datetime.now(UTC) + timedelta(hours=1))
    [row] = await store.insert_jobs(deps.db, [job])
    assert row is not None and row.run_at is not None
    assert await engine.claim_one(deps.jobs, job.id, 0, owner=OWNER, lease_s=30) is None  # early: refused
    assert await deps.db.fetch_val("SELECT dispatched_at FROM jobs WHERE id = :id", {"id": job.id}) is None
    assert await sweep.take_due(deps.db, batch=10, redispatch_after_s=60) == []  # not due: nobody rings it
    await deps.db.execute("UPDATE jobs SET next_run_at = now() WHERE id = :id", {"id": job.id})  # the hour passes
    assert engine.pairs(await sweep.take_due(deps.db, batch=10, redispatch_after_s=60)) == [(job.id, 0)]
    assert await engine.claim_one(deps.jobs, job.id, 0, owner=OWNER, lease_s=30) is not None


async def test_a_delayed_job_rung_early_is_rung_again_when_due_and_moves_up_to_its_rank(deps: Deps) -> None:
    job = new_job(run_at=datetime.now(UTC) + timedelta(seconds=30), priority=10)
    [row] = await store.insert_jobs(deps.db, [job])
    assert row is not None
    assert await enqueue_many(deps.redis, [Bell(job.id, 0, 10, "default", delay_s=30)])
    text = f"{job.id}:0"
    delayed_score = await deps.redis.zscore(QUEUE, text)
    assert await sweep.take_due(deps.db, batch=10, redispatch_after_s=60) == []
    await deps.db.execute("UPDATE jobs SET next_run_at = now() WHERE id = :id", {"id": job.id})
    [bell] = await sweep.take_due(deps.db, batch=10, redispatch_after_s=60)  # dispatched before it was due
    assert await enqueue_many(deps.redis, [bell])
    promoted = await deps.redis.zscore(QUEUE, text)
    assert delayed_score is not None and promoted is not None and promoted < delayed_score
    assert await sweep.take_due(deps.db, batch=10, redispatch_after_s=60) == []  # once


async def test_a_past_run_at_runs_now_and_a_delayed_job_can_be_cancelled_before_it_starts(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    past = "2020-01-01T00:00:00Z"
    body = {"jobs": [{**sleeps(1)[0], "run_at": past}, {**sleeps(1)[0], "delay_s": 3600}]}
    response = await client.post("/v1/jobs/batch", json=body)
    assert response.status_code == 202, response.text
    now_job, later_job = response.json()["items"]
    async with working(deps, max_jobs=5):
        await eventually(lambda: all_done(deps, [UUID(now_job["id"])]))
    later = (await client.get(f"/v1/jobs/{later_job['id']}")).json()
    assert later["status"] == "queued" and datetime.fromisoformat(later["run_at"]) > datetime.now(UTC)
    cancelled = await client.post(f"/v1/jobs/{later_job['id']}/cancel")
    assert cancelled.status_code in (200, 202) and cancelled.json()["status"] == "cancelled"


# -- priority -------------------------------------------------------------------------------------------


async def test_among_waiting_jobs_the_higher_priority_ones_start_first(client: httpx.AsyncClient, deps: Deps) -> None:
    low = (await client.post("/v1/jobs/batch", json={"jobs": sleeps(100)})).json()["items"]
    high = (await client.post("/v1/jobs/batch", json={"jobs": sleeps(10, priority=5)})).json()["items"]
    ids = [UUID(j["id"]) for j in low + high]
    async with working(deps, max_jobs=1):  # one slot: start order is exactly queue order
        await eventually(lambda: all_done(deps, ids), within=60)
    order = await started_order(deps, ids)
    assert set(order[:10]) == {UUID(j["id"]) for j in high}  # submitted last, started first


async def test_a_low_priority_job_behind_a_steady_stream_of_high_priority_ones_still_starts(
    config: Config, deps: Deps, api_key: str
) -> None:
    """Aging: with each level worth 50 ms of waiting, a -10 job outranks any +10 job that came a second after it."""
    aging = msgspec.structs.replace(config, priority_step_s=0.05)
    stream: list[UUID] = []
    async with open_app(aging, api_key) as client, working(deps, max_jobs=1, config=aging):
        await client.post("/v1/jobs/batch", json={"jobs": sleeps(20, 0.02, priority=10)})  # a backlog first
        low = (await client.post("/v1/jobs", json={**sleeps(1, 0.0)[0], "priority": -10})).json()
        for _ in range(60):  # arriving faster than one slot serves them: without aging the -10 job waits for all
            items = (await client.post("/v1/jobs/batch", json={"jobs": sleeps(5, 0.02, priority=10)})).json()
            stream += [UUID(j["id"]) for j in items["items"]]
            await asyncio.sleep(0.05)
        await eventually(lambda: all_done(deps, [UUID(low["id"])]), within=60)
    started_after = await deps.db.fetch_val(
        "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND (started_at IS NULL OR started_at > "
        "(SELECT started_at FROM jobs WHERE id = :low))",
        {"ids": stream, "low": UUID(low["id"])},
    )
    assert started_after > 0  # it did not wait for the stream to end


# -- fairness among tenants ---------------------------------------------------------------------------


async def test_one_tenants_backlog_does_not_starve_anothers_jobs(config: Config, deps: Deps, api_key: str) -> None:
    other_key = await keys.create(deps.db, "other", "tests")
    async with open_app(config, api_key) as a, open_app(config, other_key) as b:
        mine = []
        for _ in range(2):
            items = (await a.post("/v1/jobs/batch", json={"jobs": sleeps(1000)})).json()["items"]
            mine += [UUID(j["id"]) for j in items]
        theirs = [UUID(j["id"]) for j in (await b.post("/v1/jobs/batch", json={"jobs": sleeps(10)})).json()["items"]]
    async with working(deps, max_jobs=5):
        await eventually(lambda: all_done(deps, theirs), within=120)
    before = await deps.db.fetch_val(
        "SELECT count(*) FROM jobs WHERE id = ANY(:mine) AND started_at <= "
        "(SELECT max(started_at) FROM jobs WHERE id = ANY(:theirs))",
        {"mine": mine, "theirs": theirs},
    )
    assert before < 200  # B's ten all started before A's 200th, though A's 2,000 came first


# -- concurrency keys ---------------------------------------------------------------------------------


async def test_a_key_at_its_limit_turns_the_next_job_away_until_a_slot_comes_back(deps: Deps) -> None:
    jobs = [new_job("keyed", concurrency_key="acme") for _ in range(3)] + [new_job("keyed", concurrency_key="zeta")]
    await store.insert_jobs(deps.db, jobs)
    claims = await claim_keyed(deps, [(j.id, 0) for j in jobs], KEYED)
    assert [c is not None for c in claims] == [True, True, False, True]  # two of acme, and zeta is unaffected
    assert all(c.slots == ["key"] for c in claims if c is not None)
    running = await deps.db.fetch_all("SELECT key, running FROM concurrency_slots WHERE type = 'keyed' ORDER BY key")
    assert [(r["key"], r["running"]) for r in running] == [("acme", 2), ("zeta", 1)]
    # the waiting one is skipped while its key is full: no busy re-ringing
    assert await sweep.take_due(deps.db, batch=10, redispatch_after_s=0, capacity=KEYED) == []
    assert await wake_keys(deps.db, [("keyed", "acme")], KEYED, batch=10) == []
    # its worker was killed: the rescue gives the slot back in the same statement
    await deps.db.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :id", {"id": jobs[0].id}
    )
    await sweep.rescue_lost(deps.jobs, batch=10, backoff_base_s=60, backoff_cap_s=60)
    assert await deps.db.fetch_val("SELECT running FROM concurrency_slots WHERE key = 'acme'") == 1
    assert engine.pairs(await wake_keys(deps.db, [("keyed", "acme")], KEYED, batch=10)) == [(jobs[2].id, 0)]
    assert (await claim_keyed(deps, [(jobs[2].id, 0)], KEYED))[0] is not None


async def test_a_wake_arq_dropped_while_it_held_the_message_is_rung_again_once_it_lets_go(deps: Deps) -> None:
    """A slot given back between a claim turning a job away and arq letting go of that message's id: the wake
    marks the job dispatched and rings, arq drops the ring (the id is still its own), and after_job_end rings
    again. A job still waiting is not rung: no busy re-ringing."""
    jobs = [new_job("keyed", concurrency_key="acme") for _ in range(4)]
    await store.insert_jobs(deps.db, jobs)
    claims = await claim_keyed(deps, [(j.id, 0) for j in jobs], KEYED)
    assert [c is not None for c in claims] == [True, True, False, False]
    await deps.db.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :id", {"id": jobs[0].id}
    )
    await sweep.rescue_lost(deps.jobs, batch=10, backoff_base_s=60, backoff_cap_s=60)  # one slot back
    woken = await wake_keys(deps.db, [("keyed", "acme")], KEYED, batch=10)
    assert engine.pairs(woken) == [(jobs[2].id, 0)]  # its ring is the one arq dropped: nothing is enqueued here
    assert await deps.redis.zcard(QUEUE) == 0
    for job in jobs[2:]:
        await after_job_end({"deps": deps, TURNED_AWAY: (job.id, 0)})
    assert await deps.redis.zrange(QUEUE, 0, -1) == [message(jobs[2].id, 0).encode()]


async def test_concurrent_claims_never_run_more_than_a_keys_limit(deps: Deps) -> None:
    jobs = [new_job("keyed", concurrency_key="acme") for _ in range(12)]
    await store.insert_jobs(deps.db, jobs)
    claims = await asyncio.gather(*(claim_keyed(deps, [(j.id, 0)], KEYED) for j in jobs))
    assert sum(c[0] is not None for c in claims) == 2


async def test_a_concurrency_key_is_refused_on_a_type_without_a_limit_and_shown_on_one_with(
    client: httpx.AsyncClient,
) -> None:
    refused = await client.post("/v1/jobs", json={**sleeps(1)[0], "concurrency_key": "acme"})
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == "$.concurrency_key"
    taken = await client.post("/v1/jobs", json={"type": "keyed", "input": {"seconds": 0}, "concurrency_key": "acme"})
    assert taken.status_code == 202 and taken.json()["concurrency_key"] == "acme"


@pytest.mark.slow
async def test_three_workers_run_at_most_two_jobs_of_a_key_at_once_and_all_200_succeed(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    body = [{"type": "keyed", "input": {"seconds": 0.05}, "concurrency_key": f"customer-{n % 5}"} for n in range(200)]
    ids = [UUID(j["id"]) for j in (await client.post("/v1/jobs/batch", json={"jobs": body})).json()["items"]]
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            most = await deps.db.fetch_val(
                "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM jobs WHERE type = 'keyed' AND "
                "status = 'running' GROUP BY concurrency_key) c"
            )
            peak = max(peak, int(most))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        async with working(deps, max_jobs=10), working(deps, max_jobs=10), working(deps, max_jobs=10):
            await eventually(lambda: all_done(deps, ids), within=120)
    finally:
        sampler.cancel()
    assert peak == 2  # reached, never passed
    slots = await deps.db.fetch_val("SELECT sum(running) FROM concurrency_slots WHERE type = 'keyed'")
    assert slots == 0  # every slot came back


# -- rate limits ----------------------------------------------------------------------------------------

RATED = Capacity("test", 10, 0.5, rates={"rated": Rate(5, 1.0)})


async def test_a_types_starts_never_pass_its_rate_and_those_over_it_wait_then_all_run(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    await ensure_buckets(deps.db, RATED)  # as each worker's sweep does
    body = [{"type": "rated", "input": {"seconds": 0}} for _ in range(20)]
    ids = [UUID(j["id"]) for j in (await client.post("/v1/jobs/batch", json={"jobs": body})).json()["items"]]
    async with working(deps, max_jobs=10), working(deps, max_jobs=10):
        await eventually(lambda: all_done(deps, ids), within=60)
    rows = await deps.db.fetch_all("SELECT started_at FROM jobs WHERE id = ANY(:ids) ORDER BY started_at", {"ids": ids})
    starts = [r["started_at"] for r in rows]
    # A bucket of five refilled at five a second: between any two starts, at most 5 + 5 per second between them.
    # Every started_at is the database's clock in the claim that spent the token, so the bound is exact.
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            assert j - i + 1 <= 5 + 5 * (starts[j] - starts[i]).total_seconds() + 1e-6, (i, j)
    events = await deps.db.fetch_val(
        "SELECT count(*) FROM job_events WHERE job_id = ANY(:ids) AND name = 'status'", {"ids": ids}
    )
    assert events == 3 * len(ids)  # queued, running, succeeded: waiting for the rate failed nothing, retried nothing


async def test_a_rate_limited_job_waits_undispatched_until_its_bucket_exists(deps: Deps) -> None:
    job = new_job("rated")
    await store.insert_jobs(deps.db, [job])
    assert await claim_keyed(deps, [(job.id, 0)], RATED) == [None]  # no bucket yet: turned away
    assert await deps.db.fetch_val("SELECT dispatched_at FROM jobs WHERE id = :id", {"id": job.id}) is None
    await ensure_buckets(deps.db, RATED)
    assert isinstance((await claim_keyed(deps, [(job.id, 0)], RATED))[0], Claimed)


async def test_a_claim_over_the_rate_answers_a_bell_for_when_a_token_will_be_there(deps: Deps) -> None:
    await ensure_buckets(deps.db, RATED)
    jobs = [new_job("rated") for _ in range(7)]
    await store.insert_jobs(deps.db, jobs)
    answers = await claim_keyed(deps, [(j.id, 0) for j in jobs], RATED)
    assert [type(a).__name__ for a in answers] == ["Claimed"] * 5 + ["Bell"] * 2
    later = [a for a in answers if isinstance(a, Bell)]
    assert 0 < later[0].delay_s < later[1].delay_s <= 2 / 5 + 0.05  # a fifth of a second per token, in turn
    assert [b.started for b in later] == [0, 0]  # not started: the same message, rung later
