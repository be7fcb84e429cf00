"""One attempt from claim to finish, retries, timeouts and the heartbeat: an in-process burst worker."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
import msgspec
import pytest

from tests.conftest import eventually, job_row
from worker import Config, Deps, heartbeat, store
from worker.retry import backoff

Drain = Callable[[], Awaitable[None]]


async def submit(client: httpx.AsyncClient, type: str, input: dict[str, Any] | None = None, **extra: Any) -> str:
    response = await client.post("/v1/jobs", json={"type": type, "input": input or {}, **extra})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def status_events(deps: Deps, job_id: str) -> list[tuple[dict[str, Any], datetime]]:
    rows = await deps.db.fetch_all(
        "SELECT data, created_at FROM job_events WHERE job_id = CAST(:id AS uuid) AND name = 'status' ORDER BY seq",
        {"id": job_id},
    )
    return [(msgspec.json.decode(r["data"]), r["created_at"]) for r in rows]


def test_backoff_envelope_doubles_per_attempt_up_to_the_cap() -> None:
    random.seed(7)
    for attempt, envelope in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        samples = [backoff(attempt, base=1.0, cap=10.0) for _ in range(2_000)]
        assert 0 <= min(samples) and max(samples) <= envelope
        assert max(samples) > envelope * 0.95  # full jitter spans the whole envelope


async def test_retryable_failure_is_retried_with_growing_delays_then_succeeds(
    client: httpx.AsyncClient, deps: Deps, config: Config, drain: Drain
) -> None:
    job_id = await submit(client, "flaky", {"failures": 3}, max_attempts=5)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "succeeded" and job["attempt"] == 4 and job["result"] == {"attempts": 4}
    retries = [(data, at) for data, at in await status_events(deps, job_id) if data.get("next_run_at")]
    assert [data["attempt"] for data, _ in retries] == [1, 2, 3]
    for data, at in retries:
        delay = (datetime.fromisoformat(data["next_run_at"]) - at).total_seconds()
        envelope = min(config.backoff_cap_s, config.backoff_base_s * 2 ** (data["attempt"] - 1))
        assert 0 <= delay <= envelope + 0.01, (data, delay)
        assert data["error"]["type"] == "retryable_error" and data["error"]["retryable"]


async def test_attempts_exhausted_ends_failed_with_a_clean_error(client: httpx.AsyncClient, drain: Drain) -> None:
    job_id = await submit(client, "flaky", {"failures": 5}, max_attempts=2)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 2 and job["done"]
    assert job["error"] == {
        "type": "retryable_error",
        "message": "failing on purpose: attempt 2 of the first 5",
        "retryable": True,
    }


async def test_unexpected_exception_is_retried_and_reported_without_a_traceback(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, "explode", max_attempts=2)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 2
    assert job["error"]["type"] == "ZeroDivisionError"
    assert job["error"]["message"] == "an unexpected bug in the job" and "Traceback" not in str(job)


async def test_non_retryable_job_error_fails_at_once(client: httpx.AsyncClient, drain: Drain) -> None:
    job_id = await submit(client, "refuse", max_attempts=5)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 1
    assert job["error"] == {"type": "bad_input", "message": "the input can never work", "retryable": False}


async def test_a_result_that_cannot_be_encoded_fails_the_job(client: httpx.AsyncClient, drain: Drain) -> None:
    job_id = await submit(client, "unencodable", max_attempts=3)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 1 and job["error"]["type"] == "invalid_result"


async def test_a_result_integer_too_long_to_print_fails_the_job_at_once_as_invalid_result(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    """Encoding it raised ValueError, which escaped the attempt: the row stayed running through three rescues and
    ended `worker_lost`."""
    job_id = await submit(client, "big_int", {"digits": 8_600}, max_attempts=3)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert job["error"]["type"] == "invalid_result" and "4300" in job["error"]["message"]


async def test_a_result_postgres_refuses_to_store_fails_the_job_at_once_as_invalid_result(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, "raw_result", {"json": "1e1000000"}, max_attempts=3)  # past numeric's range
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert job["error"]["type"] == "invalid_result" and "could not be stored" in job["error"]["message"]


async def test_square_sum_refuses_integers_longer_than_it_can_square_and_print(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [10**4298]}})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == "$.input.data[0]"


async def test_a_job_error_message_is_cut_to_a_bounded_length(client: httpx.AsyncClient, drain: Drain) -> None:
    job_id = await submit(client, "unstorable", {"where": "long_error"}, max_attempts=1)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and len(job["error"]["message"]) == 2_000, len(job["error"]["message"])


@pytest.mark.parametrize("char", ["nul", "surrogate"])
async def test_a_result_postgres_cannot_store_fails_the_job_as_invalid_result_rather_than_stranding_it(
    client: httpx.AsyncClient, drain: Drain, char: str
) -> None:
    """A NUL or a lone surrogate: the finish would be refused, and the job left running until its lease ran out,
    then retried into the same wall, and end `worker_lost`."""
    job_id = await submit(client, "unstorable", {"where": "result", "char": char}, max_attempts=3)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["attempt"] == 1 and job["error"]["type"] == "invalid_result", job


@pytest.mark.parametrize("char", ["nul", "surrogate"])
@pytest.mark.parametrize("where", ["error", "progress", "log"])
async def test_an_unstorable_character_in_an_error_progress_or_log_line_is_stored_as_the_replacement_character(
    client: httpx.AsyncClient, deps: Deps, drain: Drain, where: str, char: str
) -> None:
    job_id = await submit(client, "unstorable", {"where": where, "char": char}, max_attempts=1)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == ("failed" if where == "error" else "succeeded"), job
    if where == "error":
        assert job["error"] == {"type": "bad\ufffdtype", "message": "before\ufffdafter", "retryable": False}
    elif where == "progress":  # the finish keeps the last message reported
        assert job["progress"] == {"fraction": 1.0, "message": "before\ufffdafter"}
    else:
        rows = await deps.db.fetch_all(
            "SELECT data FROM job_events WHERE job_id = CAST(:id AS uuid) AND name = 'log'", {"id": job_id}
        )
        assert [msgspec.json.decode(r["data"])["message"] for r in rows] == ["before\ufffdafter"]


async def test_job_over_its_timeout_fails_with_error_type_timeout(client: httpx.AsyncClient, drain: Drain) -> None:
    job_id = await submit(client, "sleep", {"seconds": 30, "steps": 1}, timeout_s=1, max_attempts=1)
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "timeout"


async def test_progress_is_written_while_running_and_ends_at_one(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 1.2, "steps": 4})
    running = asyncio.create_task(drain())

    async def partial_progress() -> float | None:
        fraction = (await client.get(f"/v1/jobs/{job_id}")).json()["progress"]["fraction"]
        return fraction if 0 < fraction < 1 else None

    assert 0 < await eventually(partial_progress) < 1  # visible to pollers mid-run, not only at the end
    await running
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["progress"] == {"fraction": 1.0, "message": "step 4 of 4"}
    fractions = [
        msgspec.json.decode(r["data"])["fraction"]
        for r in await deps.db.fetch_all(
            "SELECT data FROM job_events WHERE job_id = CAST(:id AS uuid) AND name = 'progress' ORDER BY seq",
            {"id": job_id},
        )
    ]
    assert fractions == sorted(fractions) and 1 <= len(fractions) <= 4


async def test_a_superseded_attempt_stops_at_its_next_heartbeat_and_writes_nothing(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "sleep", {"seconds": 60, "steps": 1})
    worker = asyncio.create_task(drain())

    async def running() -> bool | None:
        return (await job_row(deps, job_id))["status"] == "running" or None

    await eventually(running)
    # As if the lease had run out and another worker had claimed attempt 2.
    await deps.db.execute("UPDATE jobs SET attempt = 2 WHERE id = CAST(:id AS uuid)", {"id": job_id})
    await asyncio.wait_for(worker, 15)  # the 60 s job was stopped by its heartbeat
    row = await job_row(deps, job_id)
    assert row["status"] == "running" and row["attempt"] == 2 and row["finished_at"] is None


async def outlives_its_first_lease(client: httpx.AsyncClient, deps: Deps, drain: Drain, config: Config) -> str:
    """Run a job that never reports for 1.5 leases, until its lease has been extended and the worker is done."""
    job_id = await submit(client, "sleep_once", {"seconds": config.lease_s * 1.5})
    worker = asyncio.create_task(drain())

    async def leased() -> datetime | None:
        row = await job_row(deps, job_id)
        return row["lease_expires_at"] if row["status"] == "running" else None

    first = await eventually(leased)

    async def extended() -> bool | None:
        row = await job_row(deps, job_id)
        return (row["lease_expires_at"] or first) > first or None

    await eventually(extended)
    await asyncio.wait_for(worker, 30)
    return job_id


async def test_a_job_that_never_reports_has_its_lease_extended_and_outlives_it(
    client: httpx.AsyncClient, deps: Deps, drain: Drain, config: Config
) -> None:
    """Its heartbeat starts a third of the lease in, not at its first progress report, which never comes."""
    job_id = await outlives_its_first_lease(client, deps, drain, config)
    row = await job_row(deps, job_id)
    assert row["status"] == "succeeded" and row["attempt"] == 1


async def test_a_heartbeat_write_refused_once_does_not_end_the_heartbeat(
    client: httpx.AsyncClient, deps: Deps, drain: Drain, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat alone keeps the lease: a write refused for any reason must not end it, or the sweep would
    hand the job, still running here, to another worker."""
    beat = heartbeat.beat_many
    refused: list[object] = []

    async def refused_once(jobs: store.Jobs, *args: Any, **kwargs: Any) -> dict[UUID, heartbeat.Verdict]:
        if not refused:
            refused.append(args)
            raise ValueError("a value the database refused")
        return await beat(jobs, *args, **kwargs)

    monkeypatch.setattr(heartbeat, "beat_many", refused_once)
    job_id = await outlives_its_first_lease(client, deps, drain, config)
    assert refused and (await job_row(deps, job_id))["status"] == "succeeded"


async def test_a_job_of_a_type_this_worker_does_not_know_fails_cleanly(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    job_id = await submit(client, "square_sum", {"data": [1]})
    await deps.db.execute("UPDATE jobs SET type = 'retired_type' WHERE id = CAST(:id AS uuid)", {"id": job_id})
    await drain()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "unknown_job_type"


async def test_many_jobs_each_run_exactly_once(client: httpx.AsyncClient, deps: Deps, drain: Drain) -> None:
    count = 20
    ids = [await submit(client, "square_sum", {"data": [i, 1]}) for i in range(count)]
    await drain()
    jobs = [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
    assert [j["result"] for j in jobs] == [i * i + 1 for i in range(count)]
    assert all(j["attempt"] == 1 for j in jobs)


async def test_a_long_input_is_summed_in_a_process_pool_with_the_same_answer(
    client: httpx.AsyncClient, deps: Deps, drain: Drain
) -> None:
    from worker.job_types import sums

    data = list(range(-sums.OFF_LOOP_ABOVE, sums.OFF_LOOP_ABOVE))
    job_id = await submit(client, "square_sum", {"data": data})
    cube_id = await submit(client, "cube_sum", {"data": data[:50_000]})
    pid_id = await submit(client, "pool_pid")
    await drain()
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["result"] == sum(x * x for x in data)
    assert (await client.get(f"/v1/jobs/{cube_id}")).json()["result"] == sum(x**3 for x in data[:50_000])
    rows = await deps.db.fetch_all(
        "SELECT data FROM job_events WHERE job_id = CAST(:id AS uuid) AND name = 'progress'", {"id": job_id}
    )
    assert any(msgspec.json.decode(r["data"])["message"] == "summing in a worker process" for r in rows)
    # in_process_pool does run its work in another process, not in this one's threads.
    assert (await client.get(f"/v1/jobs/{pid_id}")).json()["result"] not in (os.getpid(), None)
