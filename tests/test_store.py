"""Guarded state changes in worker/store.py, against the real SQL."""

from __future__ import annotations

import asyncio
from uuid import UUID

import msgspec
from databases import Database
from uuid_utils.compat import uuid7

from tests import engine
from tests.conftest import job_row
from tests.engine import beat
from worker import Deps, Error, Progress, claim, store, sweep

OWNER = "test-owner"


async def new_job(db: Database, *, retry_safe: bool = True, max_attempts: int = 3, ttl_s: float = 3600) -> UUID:
    job = store.NewJob(
        id=uuid7(),
        tenant="default",
        type="square_sum",
        input=b'{"data": [1]}',
        max_attempts=max_attempts,
        timeout_s=60,
        retry_safe=retry_safe,
        callback_url=None,
        metadata=b"{}",
        ttl_s=ttl_s,
    )
    assert await engine.insert_job(db, job) is not None
    return job.id


async def events(deps: Deps, job_id: UUID) -> list[tuple[int, str, dict[str, object]]]:
    rows = await deps.db.fetch_all(
        "SELECT seq, name, data FROM job_events WHERE job_id = :id ORDER BY seq", {"id": job_id}
    )
    return [(r["seq"], r["name"], msgspec.json.decode(r["data"])) for r in rows]


def new_job_of(*, key: str | None = None, tenant: str = "default") -> store.NewJob:
    return store.NewJob(
        id=uuid7(), tenant=tenant, type="square_sum", input=b'{"data": [1]}', max_attempts=3, timeout_s=60,
        retry_safe=True, callback_url=None, metadata=b"{}", ttl_s=3600, idempotency_key=key, request_hash=b"h",
    )  # fmt: skip


async def test_a_batch_of_submits_inserts_each_job_with_its_event_and_one_per_idempotency_key(deps: Deps) -> None:
    plain, keyed, same_key, other_tenant = (
        new_job_of(),
        new_job_of(key="k"),
        new_job_of(key="k"),
        new_job_of(key="k", tenant="other"),
    )
    await deps.db.execute("INSERT INTO tenants (id) VALUES ('other')")
    rows = await store.insert_jobs(deps.db, [plain, keyed, same_key, other_tenant])
    assert [row and row.id for row in rows] == [plain.id, keyed.id, None, other_tenant.id]
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs WHERE id = :id", {"id": same_key.id}) == 0
    for job in (plain, keyed, other_tenant):
        assert [(seq, name, data["status"]) for seq, name, data in await events(deps, job.id)] == [
            (1, "status", "queued")
        ]


async def test_claim_starts_the_next_attempt_once(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    claimed = await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    assert claimed is not None and claimed.attempt == 1
    assert await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30) is None  # duplicate delivery
    row = await job_row(deps, job_id)
    assert row["status"] == "running" and row["lease_owner"] == OWNER and row["lease_expires_at"] is not None


async def test_a_batch_of_claims_starts_each_claimable_job_once_and_answers_each_in_its_place(deps: Deps) -> None:
    fresh, running, stale = await new_job(deps.db), await new_job(deps.db), await new_job(deps.db)
    await engine.claim_one(deps.jobs, running, 0, owner="other", lease_s=30)
    wanted = [(fresh, 0), (running, 0), (stale, 5), (fresh, 0)]  # the last: the same delivery twice in one batch
    claimed = await claim.claim_many(deps.jobs, wanted, owner=OWNER, lease_s=30)
    assert [c is not None and (c.id, c.attempt) for c in claimed] == [(fresh, 1), False, False, False]
    assert (await job_row(deps, running))["lease_owner"] == "other"
    assert (await job_row(deps, stale))["status"] == "queued"
    assert [name for _, name, _ in await events(deps, fresh)] == ["status", "status"]  # submitted, running


async def test_a_batch_of_finishes_moves_each_running_attempt_once_with_its_own_values(deps: Deps) -> None:
    done, retried, superseded = await new_job(deps.db), await new_job(deps.db), await new_job(deps.db)
    for job_id in (done, retried, superseded):
        await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    boom = Error("boom", "it broke", True)
    moved = await store.finish_many(
        deps.jobs,
        [
            store.Finish(done, 1, "succeeded", result=b"[1]", progress=Progress(1.0, "all of it")),
            store.Finish(retried, 1, "queued", error=boom, retry_in_s=60),
            store.Finish(superseded, 2, "succeeded", result=b"0"),  # not the attempt that runs
            store.Finish(done, 1, "failed", error=boom),  # the same attempt again: it has ended
        ],
    )
    assert moved == [True, True, False, False]
    row = await job_row(deps, done)
    assert row["status"] == "succeeded" and row["result"] == "[1]" and row["error"] is None
    assert msgspec.json.decode(row["progress"]) == {"fraction": 1.0, "message": "all of it"}
    row = await job_row(deps, retried)
    assert row["status"] == "queued" and row["error"] is None and row["dispatched_at"] is not None
    assert (await events(deps, retried))[-1][2]["error"] == {"type": "boom", "message": "it broke", "retryable": True}
    assert (await job_row(deps, superseded))["status"] == "running"


async def test_terminal_job_never_changes_status(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    assert await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"1")
    for to in ("failed", "cancelled", "expired", "queued", "succeeded"):
        assert not await store.finish(deps.jobs, job_id, 1, to, error=Error("x", "late", False))  # type: ignore[arg-type]
    await deps.db.execute("UPDATE jobs SET expires_at = now() - interval '1 second' WHERE id = :id", {"id": job_id})
    assert await sweep.expire_late(deps.jobs, batch=100) == 0
    row = await job_row(deps, job_id)
    assert row["status"] == "succeeded" and row["result"] == "1" and row["error"] is None


async def test_a_superseded_attempt_writes_nothing(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    # The lease ran out and the sweep gave the job a new attempt.
    await deps.db.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id", {"id": job_id}
    )
    assert await sweep.rescue_lost(deps.jobs, batch=10, backoff_base_s=0, backoff_cap_s=0) == [(job_id, 1)]
    assert await engine.claim_one(deps.jobs, job_id, 1, owner="other", lease_s=30) is not None
    assert await beat(deps.jobs, job_id, 1, lease_s=30, progress=None) == "superseded"
    assert not await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"0")
    assert await store.finish(deps.jobs, job_id, 2, "succeeded", result=b"1")
    assert (await job_row(deps, job_id))["result"] == "1"


async def test_rescue_requeues_a_retry_safe_job_and_fails_the_others(deps: Deps) -> None:
    safe, unsafe, exhausted = (
        await new_job(deps.db),
        await new_job(deps.db, retry_safe=False),
        await new_job(deps.db, max_attempts=1),
    )
    for job_id in (safe, unsafe, exhausted):
        await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    await deps.db.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
    assert len(await sweep.rescue_lost(deps.jobs, batch=10, backoff_base_s=1, backoff_cap_s=10)) == 3
    requeued = await job_row(deps, safe)
    assert requeued["status"] == "queued" and requeued["attempt"] == 1 and requeued["dispatched_at"] is None
    for job_id in (unsafe, exhausted):
        row = await job_row(deps, job_id)
        assert row["status"] == "failed" and msgspec.json.decode(row["error"])["type"] == "worker_lost"


async def test_expiry_and_a_finish_at_the_same_moment_end_in_exactly_one_terminal_state(deps: Deps) -> None:
    ids = [await new_job(deps.db) for _ in range(40)]
    for job_id in ids:
        await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    await deps.db.execute("UPDATE jobs SET expires_at = now()")

    async def finish(job_id: UUID) -> bool:
        return await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"1")

    outcomes = await asyncio.gather(
        *(finish(job_id) for job_id in ids[::2]),
        sweep.expire_late(deps.jobs, batch=1_000),
        *(finish(job_id) for job_id in ids[1::2]),
    )
    finished, expired = sum(o is True for o in outcomes), outcomes[len(ids) // 2]
    assert finished + expired == len(ids)  # each job moved exactly once
    for job_id in ids:
        row = await job_row(deps, job_id)
        assert row["status"] in ("succeeded", "expired") and row["finished_at"] is not None
        terminal = [e for e in await events(deps, job_id) if e[2]["status"] in ("succeeded", "expired")]
        assert len(terminal) == 1 and terminal[0][2]["status"] == row["status"]


async def test_every_change_appends_an_event_with_the_next_seq(deps: Deps) -> None:
    from worker import Progress

    job_id = await new_job(deps.db)
    await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    await beat(deps.jobs, job_id, 1, lease_s=30, progress=Progress(0.5, "half"))
    await beat(deps.jobs, job_id, 1, lease_s=30, progress=None)  # a bare heartbeat logs nothing
    await store.finish(deps.jobs, job_id, 1, "queued", error=Error("boom", "it broke", True), retry_in_s=0)
    await engine.claim_one(deps.jobs, job_id, 1, owner=OWNER, lease_s=30)
    await store.finish(deps.jobs, job_id, 2, "succeeded", result=b"1")
    log = await events(deps, job_id)
    assert [seq for seq, _, _ in log] == [1, 2, 3, 4, 5, 6]
    assert [(name, data.get("status")) for _, name, data in log] == [
        ("status", "queued"),
        ("status", "running"),
        ("progress", None),
        ("status", "queued"),
        ("status", "running"),
        ("status", "succeeded"),
    ]
    assert log[2][2] == {"fraction": 0.5, "message": "half"}
    assert log[3][2]["error"] == {"type": "boom", "message": "it broke", "retryable": True}
    row = await job_row(deps, job_id)
    assert row["event_seq"] == 6 and row["error"] is None  # a retried attempt's error stays in its event


async def test_take_due_skips_rows_another_pass_holds(deps: Deps) -> None:
    ids = {await new_job(deps.db) for _ in range(6)}
    await deps.db.execute("UPDATE jobs SET dispatched_at = NULL")
    first, second = await asyncio.gather(
        sweep.take_due(deps.db, batch=3, redispatch_after_s=60), sweep.take_due(deps.db, batch=3, redispatch_after_s=60)
    )
    taken = [bell.job_id for bell in first + second]
    assert len(taken) == len(set(taken))  # SKIP LOCKED: concurrent passes never take the same row
    rest = [bell.job_id for bell in await sweep.take_due(deps.db, batch=10, redispatch_after_s=60)]
    assert set(rest) | set(taken) == ids and not set(rest) & set(taken)
    assert await sweep.take_due(deps.db, batch=10, redispatch_after_s=60) == []  # all dispatched just now


async def test_status_events_hold_every_field_a_change_touches_as_it_left_them(deps: Deps) -> None:
    job_id = await new_job(deps.db)
    await engine.claim_one(deps.jobs, job_id, 0, owner=OWNER, lease_s=30)
    await beat(deps.jobs, job_id, 1, lease_s=30, progress=Progress(0.5, "half"))
    await store.finish(deps.jobs, job_id, 1, "queued", error=Error("boom", "it broke", True), retry_in_s=5)
    await deps.db.execute("UPDATE jobs SET next_run_at = now() WHERE id = :id", {"id": job_id})  # its backoff ends
    await engine.claim_one(deps.jobs, job_id, 1, owner=OWNER, lease_s=30)
    await store.finish(deps.jobs, job_id, 2, "failed", error=Error("bad", "no", False))
    statuses = [data for _, name, data in await events(deps, job_id) if name == "status"]
    queued, running, retry, again, failed = statuses
    assert queued["started_at"] is None and queued["progress"] == {"fraction": 0.0, "message": None}
    assert running["started_at"] is not None and running["finished_at"] is None
    assert retry["progress"] == {"fraction": 0.5, "message": "half"} and retry["next_run_at"]
    assert "next_run_at" not in again and again["attempt"] == 2
    assert failed["finished_at"] is not None and failed["error"]["type"] == "bad"
