"""An idle worker's poll, woken by the doorbell (worker/wake.py): a submit, an abort and a lost subscription, on real
processes whose fallback poll (the health key's refresh) is two minutes away; and the shape of arq the hook needs."""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from arq.worker import Worker

from tests.conftest import Processes, eventually, process_env, running, wait_done
from worker import Config, Deps, wake
from worker.connections import QUEUE
from worker.queue import channel

FALLBACK_S = 120  # the health check interval, so an idle worker's own poll comes only this often
WITHIN_S = 30.0  # well before it (and on a loaded machine): only a wake starts the job this soon
READY_S = 60.0  # a worker process's start, on a machine the suite may be loading
QUIET_S = 3  # seconds every connection of an idle worker's but its subscription goes without a command


def slow(config: Config) -> Config:
    """Idle polls FALLBACK_S apart, the heartbeat as far (a third of the lease: so a cancel can only reach a running
    attempt through arq's abort), a sweep that re-rings nothing for as long, and a SIGTERM's grace as long."""
    return msgspec.structs.replace(
        config,
        worker_health_check_interval_s=FALLBACK_S,
        lease_s=3.0 * FALLBACK_S,
        redispatch_after_s=FALLBACK_S,
        shutdown_grace_s=FALLBACK_S,
    )


@pytest.fixture
async def idle(config: Config, deps: Deps, api_key: str, tmp_path: Path) -> AsyncIterator[Processes]:
    """A web and a `slow` worker, the worker subscribed and past its first poll."""
    async with running(slow(config), api_key, tmp_path) as procs:
        await waiting(deps)
        yield procs


async def subscribed(deps: Deps) -> None:
    async def check() -> bool | None:
        [(_, n)] = await deps.redis.pubsub_numsub(channel(deps.redis))
        return n >= 1 or None

    await eventually(check, within=READY_S)


async def waiting(deps: Deps) -> None:
    """Until the worker named `worker` is subscribed and has polled once (its first poll writes its health key)."""
    await subscribed(deps)

    async def polled() -> bool | None:
        return bool(await deps.redis.exists(f"{QUEUE}:health-check:worker")) or None

    await eventually(polled, within=READY_S)


async def test_an_idle_worker_sends_redis_nothing_until_its_health_check(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    """arq alone polls 20 times a second (`poll_delay` 0.05 s), so one of its connections is never idle."""
    procs = Processes(process_env(slow(config)), tmp_path, api_key)
    procs.start_worker()  # no web: every other connection to this index is the worker's, or this test's own
    try:
        await waiting(deps)
        db = deps.redis.connection_pool.connection_kwargs.get("db", 0)

        async def quiet() -> list[dict[str, str]] | None:
            clients = [
                c
                for c in await deps.redis.client_list()
                if int(c["db"]) == db and c["cmd"] != "client|list" and not c["name"].startswith("outlast-wake:")
            ]
            return clients if clients and all(int(c["idle"]) >= QUIET_S for c in clients) else None

        await eventually(quiet, within=QUIET_S + 10)
    finally:
        procs.stop()


async def test_an_idle_worker_starts_a_submit_when_the_doorbell_rings_not_at_its_next_poll(
    idle: Processes,
) -> None:
    async with idle.client() as client:
        submitted = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [3]}})
        job = await wait_done(client, submitted.json()["id"], within=WITHIN_S)
    assert job["status"] == "succeeded" and job["result"] == 9


async def test_a_cancel_reaches_a_running_job_on_an_idle_worker_at_once(idle: Processes) -> None:
    async with idle.client() as client:
        submitted = await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 600, "steps": 1}})
        job_id = submitted.json()["id"]

        async def started() -> bool | None:
            return (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running" or None

        await eventually(started, within=WITHIN_S)
        assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
        job = await wait_done(client, job_id, within=WITHIN_S)  # the worker with a free slot was waiting, not polling
    assert job["status"] == "cancelled"


async def test_a_sigterm_after_a_job_stops_an_idle_worker_at_once_not_at_the_end_of_its_grace(
    idle: Processes,
) -> None:
    """arq's graceful stop waits until its poll has forgotten every finished job's task: a worker waiting for the
    doorbell still polls while it holds one, or a SIGTERM would wait out the grace (FALLBACK_S) and be killed."""
    async with idle.client() as client:
        submitted = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [2]}})
        await wait_done(client, submitted.json()["id"], within=WITHIN_S)
    assert idle.worker is not None
    idle.worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(idle.worker.wait, WITHIN_S) == 0


async def test_the_subscription_comes_back_after_redis_drops_it(idle: Processes, deps: Deps) -> None:
    [subscriber] = [c for c in await deps.redis.client_list() if c["name"] == "outlast-wake:worker"]
    assert await deps.redis.client_kill_filter(_id=subscriber["id"]) == 1

    async def again() -> bool | None:
        names = {c["name"]: c["id"] for c in await deps.redis.client_list()}
        return names.get("outlast-wake:worker") not in (None, subscriber["id"]) or None

    await eventually(again)
    await subscribed(deps)
    async with idle.client() as client:
        submitted = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [4]}})
        job = await wait_done(client, submitted.json()["id"], within=WITHIN_S)
    assert job["result"] == 16


async def test_arq_still_has_the_shape_the_wake_hooks_into() -> None:
    """What worker/wake.py relies on in arq's Worker; a new arq that changes it fails here, not in production."""
    main = inspect.getsource(Worker.main)
    assert "async for _ in poll(self.poll_delay_s):" in main and "await self._poll_iteration()" in main
    iteration = inspect.getsource(wake.arq_poll_iteration)
    assert "zrangebyscore" in iteration and "_cancel_aborted_jobs" in iteration and "heart_beat" in iteration
    health = inspect.getsource(Worker.record_health)
    assert "(now_ts - self._last_health_check) < self.health_check_interval" in health
    assert "int((self.health_check_interval + 1) * 1000)" in health
    worker = Worker(functions=[wake.poll_iteration], handle_signals=False)  # any coroutine function: arq needs one
    assert "while len(self.tasks):" in inspect.getsource(Worker._sleep_until_tasks_complete)
    assert "await self.start_jobs(job_ids)" in iteration and "num=count" in iteration
    assert "count = self.queue_read_limit" in iteration
    names = ("ctx", "burst", "job_counter", "max_jobs", "queue_name", "health_check_interval", "tasks")
    for name in (*names, "queue_read_limit"):
        assert hasattr(worker, name), name
    assert worker._last_health_check == 0
    assert isinstance(inspect.getattr_static(Worker, "pool"), property)
    wake.install()
    assert Worker._poll_iteration is wake.poll_iteration and Worker.start_jobs is wake.start_jobs
