"""Retention (worker/retention.py): what goes with a job past it, what stays, that each pass takes one batch, and
that the sweep retains once a minute, or at every pass while a backlog fills its batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec

from tests.conftest import eventually, job_row
from tests.test_worker import submit
from worker import Deps, metrics
from worker.retention import Cadence, Retained, retain
from worker.sweep import sweep_once, sweeping

Drain = Callable[[], Awaitable[None]]


async def _count(deps: Deps, sql: str, job_id: str) -> int:
    count: int = await deps.db.fetch_val(sql, {"id": job_id})
    return count


async def _finished_days_ago(deps: Deps, job_id: str, days: int) -> None:
    await deps.db.execute(
        "UPDATE jobs SET finished_at = now() - make_interval(days => :days) WHERE id = CAST(:id AS uuid)",
        {"id": job_id, "days": days},
    )


async def test_a_job_past_retention_goes_with_its_events_webhook_deliveries_and_their_attempts(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    old = await submit(client, "square_sum", {"data": [1]})
    await drain()
    delivery = await deps.db.fetch_val(
        "INSERT INTO webhook_deliveries (job_id, url, reason, status, attempts, finished_at)"
        " VALUES (CAST(:id AS uuid), 'https://example.com/hook', 'finished', 'delivered', 1, now()) RETURNING id",
        {"id": old},
    )
    await deps.db.execute(
        "INSERT INTO webhook_attempts (delivery_id, n, finished_at, status_code) VALUES (:d, 1, now(), 200)",
        {"d": delivery},
    )
    await _finished_days_ago(deps, old, 31)
    await sweep_once(deps)
    assert await _count(deps, "SELECT count(*) FROM jobs WHERE id = CAST(:id AS uuid)", old) == 0
    assert await _count(deps, "SELECT count(*) FROM job_events WHERE job_id = CAST(:id AS uuid)", old) == 0
    assert await _count(deps, "SELECT count(*) FROM webhook_deliveries WHERE job_id = CAST(:id AS uuid)", old) == 0
    assert await deps.db.fetch_val("SELECT count(*) FROM webhook_attempts WHERE delivery_id = :d", {"d": delivery}) == 0


async def test_a_parent_past_retention_leaves_its_children_and_a_schedule_its_last_job_standing(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    parent, child = await submit(client, "square_sum", {"data": [1]}), await submit(client, "square_sum", {"data": [2]})
    await drain()
    await deps.db.execute(
        "UPDATE jobs SET parent_id = CAST(:parent AS uuid) WHERE id = CAST(:child AS uuid)",
        {"parent": parent, "child": child},
    )
    await deps.db.execute(
        "INSERT INTO schedules (tenant_id, id, cron, timezone, type, input, next_run_at, last_job_id)"
        " VALUES ('default', 'nightly', '0 3 * * *', 'UTC', 'square_sum', '{\"data\": [1]}', now() + interval '1 day',"
        " CAST(:job AS uuid))",
        {"job": parent},
    )
    await _finished_days_ago(deps, parent, 31)
    await sweep_once(deps)
    assert (await client.get(f"/v1/jobs/{parent}")).status_code == 404
    row = await job_row(deps, child)
    assert row["parent_id"] is None and row["status"] == "succeeded"
    assert str(await deps.db.fetch_val("SELECT last_job_id FROM schedules WHERE id = 'nightly'")) == parent


async def test_each_pass_deletes_one_batch_oldest_first_and_never_a_job_within_retention_or_live(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    ended = [await submit(client, "square_sum", {"data": [n]}) for n in range(5)]
    await drain()
    recent, live = await submit(client, "square_sum", {"data": [9]}), await submit(client, "square_sum", {"data": [8]})
    await drain()
    await deps.db.execute(
        "UPDATE jobs SET status = 'queued', finished_at = NULL, result = NULL,"
        " created_at = now() - interval '60 days' WHERE id = CAST(:id AS uuid)",
        {"id": live},
    )
    for days, job_id in enumerate(ended, 31):
        await _finished_days_ago(deps, job_id, days)
    await _finished_days_ago(deps, recent, 29)
    config = msgspec.structs.replace(deps.config, sweep_batch=2)

    async def left() -> list[str]:
        rows = await deps.db.fetch_all("SELECT id FROM jobs ORDER BY finished_at NULLS LAST")
        return [str(r["id"]) for r in rows]

    assert (await retain(deps.db, config)).deleted == 2
    assert await left() == [*reversed(ended[:3]), recent, live]
    assert (await retain(deps.db, config)).deleted == 2
    assert (await retain(deps.db, config)).deleted == 1
    assert (await retain(deps.db, config)).deleted == 0
    assert await left() == [recent, live]


async def test_results_past_retention_are_purged_one_batch_a_pass(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    done = [await submit(client, "square_sum", {"data": [n]}) for n in range(3)]
    await drain()
    for job_id in done:
        await _finished_days_ago(deps, job_id, 8)
    config = msgspec.structs.replace(deps.config, sweep_batch=2)
    assert (await retain(deps.db, config)).purged == 2
    assert (await retain(deps.db, config)).purged == 1
    assert [(await client.get(f"/v1/jobs/{j}/result")).status_code for j in done] == [410, 410, 410]


async def test_the_sweep_releases_an_idempotency_key_past_its_window_and_keeps_one_within_it(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    body: dict[str, Any] = {"type": "square_sum", "input": {"data": [3]}}
    old = (await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "old"})).json()["id"]
    kept = (await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "kept"})).json()["id"]
    await deps.db.execute(
        "UPDATE jobs SET created_at = now() - interval '25 hours' WHERE id = CAST(:id AS uuid)", {"id": old}
    )
    assert (await retain(deps.db, deps.config)).released == 1
    assert (await job_row(deps, old))["idempotency_key"] is None
    assert (await job_row(deps, kept))["idempotency_key"] == "kept"
    # the released key makes a new job; the kept one still replays its own
    again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "old"})
    assert again.status_code == 202 and again.json()["id"] != old and "idempotent-replayed" not in again.headers
    replay = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "kept"})
    assert replay.json()["id"] == kept and replay.headers["idempotent-replayed"] == "true"


def _deleted(n: int) -> Retained:
    return Retained(purged=0, deleted=n, workflows=0, released=0)


def test_the_sweep_retains_on_its_first_pass_then_once_a_minute_and_at_the_next_pass_after_a_full_batch() -> None:
    cadence = Cadence(every_s=60.0)
    assert cadence.due(0.0)
    cadence.done(0.0, _deleted(3), batch=500)
    assert not cadence.due(59.9) and cadence.due(60.0)
    cadence.done(60.0, _deleted(500), batch=500)  # a full batch: more is waiting, so the very next pass retains
    assert cadence.due(60.1)
    cadence.done(61.0, Retained(purged=500, deleted=0, workflows=0, released=0), batch=500)
    assert cadence.due(61.1)
    cadence.done(62.0, _deleted(0), batch=500)
    assert not cadence.due(121.9) and cadence.due(122.0)


def _passes() -> float:
    return metrics.REGISTRY.get_sample_value("outlast_sweep_seconds_count") or 0.0


async def test_the_sweep_loop_takes_a_backlog_a_batch_a_pass_then_waits_a_minute(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    ended = [await submit(client, "square_sum", {"data": [n]}) for n in range(5)]
    later = await submit(client, "square_sum", {"data": [9]})
    await drain()
    for job_id in ended:
        await _finished_days_ago(deps, job_id, 31)
    small = dataclasses.replace(deps, config=msgspec.structs.replace(deps.config, sweep_batch=2))

    async def gone() -> bool | None:
        left = await deps.db.fetch_val("SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))", {"ids": ended})
        return left == 0 or None

    async with sweeping(small):
        await eventually(gone)  # 2, 2, then 1: three passes in a row, not three minutes
        await _finished_days_ago(deps, later, 31)
        seen = _passes()

        async def two_more_passes() -> bool | None:
            return _passes() >= seen + 2 or None

        await eventually(two_more_passes)
        assert (await job_row(deps, later))["status"] == "succeeded"  # the last pass took less than a batch
