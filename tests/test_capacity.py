"""How many jobs a tenant runs at once (worker/capacity.py, the claim in worker/store.py, migrations/0006): one
tenant's long jobs never take every worker slot, and a slot comes back however its job stops running."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from uuid_utils.compat import uuid7

from tests import engine
from tests.conftest import ROOT, Processes, bearer, eventually, process_env, wait_done
from worker import Config, Deps, claim, keys, store, sweep
from worker.capacity import Capacity, default_cap, refresh, wake

OWNER = "test-owner"
NO_DEFAULT = Capacity("test", 10, 0.5)  # no default cap, no concurrency limits


def sleeper(tenant: str) -> store.NewJob:
    return store.NewJob(
        id=uuid7(), tenant=tenant, type="sleep", input=b'{"seconds": 3600}', max_attempts=3, timeout_s=3600,
        retry_safe=True, callback_url=None, metadata=b"{}", ttl_s=3600,
    )  # fmt: skip


async def queued(deps: Deps, n: int, *, tenant: str = "default") -> list[UUID]:
    jobs = [sleeper(tenant) for _ in range(n)]
    await store.insert_jobs(deps.db, jobs)
    return [job.id for job in jobs]


async def limit(deps: Deps, tenant: str, max_running: int | None) -> None:
    await deps.db.execute(
        "INSERT INTO tenants (id, max_running) VALUES (:t, :n) ON CONFLICT (id) DO UPDATE SET max_running = :n",
        {"t": tenant, "n": max_running},
    )


async def running_count(deps: Deps, tenant: str = "default") -> tuple[int, int]:
    """(the tenant's counter, the jobs actually running under its cap)."""
    counter = await deps.db.fetch_val("SELECT running FROM tenants WHERE id = :t", {"t": tenant})
    actual = await deps.db.fetch_val(
        "SELECT count(*) FROM jobs WHERE tenant_id = :t AND status = 'running' AND slots IS NOT NULL", {"t": tenant}
    )
    return int(counter), int(actual)


async def test_a_claim_admits_no_more_than_the_tenants_cap_and_the_rest_wait_undispatched(deps: Deps) -> None:
    await limit(deps, "default", 2)
    ids = await queued(deps, 5)
    claimed = await claim.claim_many(deps.jobs, [(job_id, 0) for job_id in ids], owner=OWNER, lease_s=30)
    assert [c is not None for c in claimed] == [True, True, False, False, False]  # in the order they came
    assert all(c.slots == ["tenant"] for c in claimed if c is not None)
    assert await running_count(deps) == (2, 2)
    waiting = await deps.db.fetch_val(
        "SELECT count(*) FROM jobs WHERE status = 'queued' AND dispatched_at IS NULL AND id = ANY(:ids)",
        {"ids": ids[2:]},
    )
    assert waiting == 3  # holding nothing: no worker slot, no arq message; the sweep skips them while full
    assert await sweep.take_due(deps.db, batch=100, redispatch_after_s=0) == []


async def test_concurrent_claims_never_take_more_than_the_cap_between_them(deps: Deps) -> None:
    """Each claim locks the tenant's row and reads the count the one before it left."""
    await limit(deps, "default", 3)
    ids = await queued(deps, 12)
    claims = await asyncio.gather(*(engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30) for job_id in ids))
    assert sum(c is not None for c in claims) == 3
    assert await running_count(deps) == (3, 3)


async def test_a_tenant_without_a_cap_of_its_own_takes_the_default_and_others_are_unaffected(deps: Deps) -> None:
    await limit(deps, "other", None)
    mine, theirs = await queued(deps, 3), await queued(deps, 3, tenant="other")
    await limit(deps, "default", 5)  # its own cap wins over the default
    claims = await claim.claim_many(deps.jobs, [(i, 0) for i in mine + theirs], owner=OWNER, lease_s=30,
                                    capacity=Capacity("w", 10, 0.5, default_cap=1))  # fmt: skip
    assert [c is not None for c in claims] == [True, True, True, True, False, False]
    assert await running_count(deps, "other") == (1, 1)
    uncapped = await claim.claim_many(deps.jobs, [(i, 0) for i in await queued(deps, 3, tenant="other")], owner=OWNER,
                                      lease_s=30)  # fmt: skip
    assert all(c is not None and c.slots is None for c in uncapped)  # no cap in force: nothing counted
    assert await running_count(deps, "other") == (1, 1)


@pytest.mark.parametrize("how", ["succeeded", "retried", "failed", "interrupted", "rescued", "expired", "deleted"])
async def test_a_slot_comes_back_however_its_job_stops_running(deps: Deps, how: str) -> None:
    await limit(deps, "default", 1)
    first, second = await queued(deps, 2)
    claimed = await engine.claim_one(deps.jobs, first, 0, owner=OWNER, lease_s=30)
    assert claimed is not None and await engine.claim_one(deps.jobs, second, 0, owner=OWNER, lease_s=30) is None
    if how in ("succeeded", "retried", "failed"):
        to = {"succeeded": "succeeded", "retried": "queued", "failed": "failed"}[how]
        assert await store.finish(deps.jobs, first, 1, to, result=b"1" if to == "succeeded" else None)  # type: ignore[arg-type]
    elif how == "interrupted":
        assert await store.interrupt(deps.jobs, first, 1) == "queued"
    elif how == "rescued":
        await deps.db.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :id", {"id": first})
        assert await sweep.rescue_lost(deps.jobs, batch=10, backoff_base_s=1, backoff_cap_s=1) == [(first, 1)]
    elif how == "expired":
        await deps.db.execute("UPDATE jobs SET expires_at = now() WHERE id = :id", {"id": first})
        assert await sweep.expire_late(deps.jobs, batch=10) == 1
    else:
        await deps.db.execute("DELETE FROM jobs WHERE id = :id", {"id": first})
    assert await running_count(deps) == (0, 0)
    assert engine.pairs(await wake(deps.db, ["default"], NO_DEFAULT, batch=10)) == [(second, 0)]  # it waited
    assert await engine.claim_one(deps.jobs, second, 0, owner=OWNER, lease_s=30) is not None


async def test_wake_dispatches_only_as_many_waiting_jobs_as_there_is_room(deps: Deps) -> None:
    await limit(deps, "default", 2)
    ids = await queued(deps, 6)
    await claim.claim_many(deps.jobs, [(i, 0) for i in ids], owner=OWNER, lease_s=30)
    assert await wake(deps.db, ["default"], NO_DEFAULT, batch=10) == []  # full
    await store.finish(deps.jobs, ids[0], 1, "succeeded", result=b"1")
    assert engine.pairs(await wake(deps.db, ["default"], NO_DEFAULT, batch=10)) == [(ids[2], 0)]  # the oldest waiting


def test_the_default_cap_is_a_share_of_the_live_slots_once_tenants_could_starve_each_other() -> None:
    assert default_cap(slots=100, tenants=1, share=0.5) is None  # one tenant starves nobody
    assert default_cap(slots=100, tenants=2, share=0.5) == 50
    assert default_cap(slots=3, tenants=5, share=0.5) == 2
    assert default_cap(slots=1, tenants=2, share=0.1) == 1  # never zero: every tenant can run something
    assert default_cap(slots=100, tenants=2, share=1.0) is None


async def test_each_sweep_pass_counts_the_live_workers_slots(deps: Deps) -> None:
    one, two = Capacity("one", 10, 0.5), Capacity("two", 30, 0.5)
    await refresh(deps.db, one, fresh_s=60)
    assert one.default_cap is None  # no two tenants hold keys yet
    await keys.create(deps.db, "default")
    await keys.create(deps.db, "acme")
    await refresh(deps.db, two, fresh_s=60)
    await refresh(deps.db, one, fresh_s=60)
    assert one.default_cap == two.default_cap == 20  # half of 10 + 30
    await deps.db.execute("UPDATE workers SET seen_at = now() - interval '2 minutes' WHERE name = 'two'")
    await refresh(deps.db, one, fresh_s=60)
    assert one.default_cap == 5  # a worker not seen lately has no slots to share


# -- real processes ---------------------------------------------------------------------------------


@pytest.fixture
async def two_tenants(config: Config, deps: Deps, api_key: str, tmp_path: Path) -> AsyncIterator[tuple[Processes, str]]:
    """A web and a worker with 4 slots, serving tenants `default` (key `api_key`) and `acme` (the key returned):
    by default each may run 2 jobs at once."""
    other = await keys.create(deps.db, "acme")
    procs = Processes(
        process_env(config, OUTLAST_WORKER_MAX_JOBS="4", OUTLAST_TENANT_MAX_SHARE="0.5"), tmp_path, api_key
    )
    procs.start_web()
    procs.start_worker()
    try:
        await procs.ready()
        yield procs, other
    finally:
        procs.stop()


@pytest.mark.slow
async def test_one_tenants_long_jobs_never_hold_every_slot_and_another_tenants_job_runs_meanwhile(
    two_tenants: tuple[Processes, str], deps: Deps
) -> None:
    """Fifty day-long sleeps of one tenant held every slot, and another tenant's square_sum waited for them."""
    procs, other = two_tenants
    async with procs.client() as client:
        long = [
            (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 86_400}})).json()["id"]
            for _ in range(6)
        ]

        async def two_running() -> bool | None:
            return await running_count(deps) == (2, 2) or None

        await eventually(two_running)
        async with httpx.AsyncClient(base_url=procs.url, headers=bearer(other)) as theirs:
            job = (await theirs.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [2]}})).json()
            assert (await wait_done(theirs, job["id"]))["result"] == 4
        statuses = [(await client.get(f"/v1/jobs/{i}")).json()["status"] for i in long]
        assert sorted(statuses) == ["queued"] * 4 + ["running"] * 2
        # Cancel the running two: the slots they give back wake two of the waiting four.
        for job_id, status in zip(long, statuses, strict=True):
            if status == "running":
                assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202

        async def two_others_running() -> list[str] | None:
            now = [(await client.get(f"/v1/jobs/{i}")).json()["status"] for i in long]
            return now if sorted(now) == ["cancelled"] * 2 + ["queued"] * 2 + ["running"] * 2 else None

        await eventually(two_others_running)
        assert await running_count(deps) == (2, 2)


@pytest.mark.slow
async def test_a_killed_workers_slots_come_back_with_its_rescue(two_tenants: tuple[Processes, str], deps: Deps) -> None:
    procs, _ = two_tenants
    async with procs.client() as client:
        ids = [
            (await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 1.5, "steps": 3}})).json()["id"]
            for _ in range(4)
        ]

        async def two_running() -> bool | None:
            return await running_count(deps) == (2, 2) or None

        await eventually(two_running)
        assert procs.worker is not None
        procs.worker.send_signal(signal.SIGKILL)
        procs.worker.wait()
        procs.start_worker("replacement")
        for job_id in ids:  # the two lost attempts are rescued, run again, and the other two get their turn
            assert (await wait_done(client, job_id, within=60))["status"] == "succeeded"
    assert await running_count(deps) == (0, 0)


@pytest.mark.slow
async def test_outlast_tenants_limit_sets_a_tenants_cap_and_list_shows_it(config: Config, deps: Deps) -> None:
    env = {**process_env(config), "PATH": os.environ.get("PATH", "")}

    def outlast(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(Path(sys.executable).parent / "outlast"), *args]
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    assert outlast("tenants", "limit", "default", "3").returncode == 0
    assert await deps.db.fetch_val("SELECT max_running FROM tenants WHERE id = 'default'") == 3
    listed = outlast("tenants", "list")
    assert listed.returncode == 0 and "default" in listed.stdout and " 3 " in listed.stdout
    assert outlast("tenants", "limit", "default", "default").returncode == 0
    assert await deps.db.fetch_val("SELECT max_running FROM tenants WHERE id = 'default'") is None
    assert outlast("tenants", "limit", "nobody", "1").returncode == 1
    assert "number of jobs" in outlast("tenants", "limit", "default", "lots").stderr
