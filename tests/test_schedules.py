"""Cron schedules: /v1/schedules, the ticker (worker/ticker.py) and schedules declared in code, against real PostgreSQL
and Redis. Ticks are driven with a fixed `now`: no test waits for a minute to pass."""

from __future__ import annotations

import asyncio
import math
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Processes, bearer, deployment_config, eventually, job_row, process_env
from worker import Config, Deps, Schedule, connect, cron, keys, notify, schedules
from worker.job_types import load
from worker.ticker import tick, ticking

SHAPE = {"id", "cron", "timezone", "type", "input", "metadata", "paused", "declared", "next_run_at", "last_run_at",
         "last_job_id"}  # fmt: skip
T = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)  # a tick of every `*/5 * * * *` schedule
FIVE = timedelta(minutes=5)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer = await client.post(
        "/v1/schedules", json={"cron": "*/5 * * * *", "type": "square_sum", "input": {"data": [1, 2, 3]}, **body}
    )
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


async def due_at(deps: Deps, schedule_id: str, moment: datetime) -> None:
    """Book the schedule's next run at `moment`, as if it had last ticked before it."""
    await deps.db.execute("UPDATE schedules SET next_run_at = :t WHERE id = :id", {"t": moment, "id": schedule_id})


async def jobs_of(deps: Deps, schedule_id: str) -> list[dict[str, Any]]:
    rows = await deps.db.fetch_all(
        "SELECT id, status, metadata, idempotency_key FROM jobs WHERE metadata->>'schedule_id' = :id ORDER BY id",
        {"id": schedule_id},
    )
    return [dict(r._mapping) for r in rows]


@pytest.fixture
def job_types(config: Config) -> Any:
    return load(config.job_modules)


# -- the API ----------------------------------------------------------------------------------------


async def test_create_answers_201_with_the_schedule_and_its_first_tick(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/v1/schedules",
        json={"id": "reports", "cron": "*/5 * * * *", "timezone": "Europe/Paris", "type": "square_sum",
              "input": {"data": [1, 2, 3]}, "metadata": {"team": "ops"}},
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"] == "/v1/schedules/reports"
    body = answer.json()
    assert set(body) == SHAPE
    assert body["input"] == {"data": [1, 2, 3]} and body["metadata"] == {"team": "ops"}
    assert (body["paused"], body["declared"], body["last_run_at"], body["last_job_id"]) == (False, False, None, None)
    next_run = parse(body["next_run_at"])
    assert next_run.minute % 5 == 0 and next_run.second == 0
    assert timedelta(0) < next_run - datetime.now(UTC) <= FIVE + timedelta(seconds=5)
    assert (await client.get("/v1/schedules/reports")).json() == body


async def test_without_an_id_one_is_made_and_the_list_pages_by_id(client: httpx.AsyncClient) -> None:
    made = [await create(client) for _ in range(3)]
    assert len({m["id"] for m in made}) == 3
    first = (await client.get("/v1/schedules", params={"limit": 2})).json()
    assert [s["id"] for s in first["items"]] == sorted(m["id"] for m in made)[:2]
    rest = (await client.get("/v1/schedules", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [s["id"] for s in rest["items"]] == sorted(m["id"] for m in made)[2:] and rest["next_cursor"] is None


async def test_an_id_taken_is_a_409_naming_it(client: httpx.AsyncClient) -> None:
    await create(client, id="once")
    again = await client.post("/v1/schedules", json={"id": "once", "cron": "* * * * *", "type": "sleep"})
    assert again.status_code == 409 and again.json()["errors"][0]["loc"] == "$.id"


@pytest.mark.parametrize(
    ("change", "slug", "loc"),
    [
        ({"cron": "61 * * * *"}, "validation-error", "$.cron"),
        ({"cron": "0 * * * * *"}, "validation-error", "$.cron"),
        ({"cron": ""}, "validation-error", "$.cron"),
        ({"timezone": "Mars/Olympus_Mons"}, "validation-error", "$.timezone"),
        ({"timezone": "../../../etc/passwd"}, "validation-error", "$.timezone"),
        ({"type": "no_such_type"}, "unknown-job-type", "$.type"),
        ({"input": {"data": ["x"]}}, "validation-error", "$.input.data[0]"),
        ({"metadata": "not an object"}, "validation-error", "$.metadata"),
        ({"id": "has a space"}, "validation-error", "$.id"),
        ({"status": "queued"}, "validation-error", "$"),  # as a submit's: at the body, its message names the field
    ],
)
async def test_a_bad_field_is_a_422_naming_it_and_nothing_is_written(
    client: httpx.AsyncClient, change: dict[str, Any], slug: str, loc: str
) -> None:
    body = {"cron": "*/5 * * * *", "type": "square_sum", "input": {"data": [1]}, **change}
    answer = await client.post("/v1/schedules", json=body)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["type"] == f"/problems/{slug}" and problem["errors"][0]["loc"] == loc
    assert loc != "$" or "`status`" in problem["errors"][0]["msg"]
    assert (await client.get("/v1/schedules")).json()["items"] == []


@pytest.mark.parametrize(
    ("change", "loc"),
    [({"cron": "* * 32 * *"}, "$.cron"), ({"timezone": "CEST"}, "$.timezone"), ({"type": "sleep"}, "$.input")],
)
async def test_a_bad_change_is_a_422_naming_it_and_changes_nothing(
    client: httpx.AsyncClient, change: dict[str, Any], loc: str
) -> None:
    before = await create(client, id="steady")
    answer = await client.patch("/v1/schedules/steady", json=change)  # a sleep's Input has no `data`
    assert answer.status_code == 422 and answer.json()["errors"][0]["loc"] == loc, answer.text
    assert (await client.get("/v1/schedules/steady")).json() == before


async def test_a_new_cron_books_the_first_tick_of_the_new_one(client: httpx.AsyncClient) -> None:
    await create(client, id="hourly")
    changed = await client.patch("/v1/schedules/hourly", json={"cron": "0 * * * *", "metadata": {"v": 2}})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["cron"] == "0 * * * *" and body["metadata"] == {"v": 2}
    next_run = parse(body["next_run_at"])
    assert (next_run.minute, next_run.second) == (0, 0) and next_run > datetime.now(UTC)


async def test_pause_clears_the_next_run_and_resume_books_the_first_tick_after_now(
    client: httpx.AsyncClient, deps: Deps
) -> None:
    await create(client, id="nap")
    await due_at(deps, "nap", T)  # long past
    paused = (await client.patch("/v1/schedules/nap", json={"paused": True})).json()
    assert paused["paused"] is True and paused["next_run_at"] is None
    resumed = (await client.patch("/v1/schedules/nap", json={"paused": False})).json()
    assert resumed["paused"] is False and parse(resumed["next_run_at"]) > datetime.now(UTC)  # T is not run


async def test_delete_answers_204_and_then_the_schedule_is_gone(client: httpx.AsyncClient) -> None:
    await create(client, id="brief")
    assert (await client.delete("/v1/schedules/brief")).status_code == 204
    for answer in (
        await client.get("/v1/schedules/brief"),
        await client.delete("/v1/schedules/brief"),
        await client.patch("/v1/schedules/brief", json={"paused": True}),
        await client.post("/v1/schedules/brief/trigger"),
    ):
        assert answer.status_code == 404, answer.text


async def test_another_tenants_schedule_answers_as_an_unknown_one(client: httpx.AsyncClient, deps: Deps) -> None:
    await create(client, id="mine")
    other = bearer(await keys.create(deps.db, "beta"))
    assert (await client.get("/v1/schedules", headers=other)).json()["items"] == []
    for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/trigger")):
        body = {"paused": True} if method == "PATCH" else None
        answer = await client.request(method, f"/v1/schedules/mine{path}", json=body, headers=other)
        assert answer.status_code == 404, (method, path)
    assert (await client.get("/v1/schedules/mine")).json()["paused"] is False
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 0


async def test_trigger_answers_202_with_a_job_that_runs_and_the_next_tick_stays(
    client: httpx.AsyncClient, deps: Deps, drain: Callable[[], Awaitable[None]]
) -> None:
    before = await create(client, id="now")
    await client.patch("/v1/schedules/now", json={"paused": True})  # a trigger runs a paused schedule too
    answer = await client.post("/v1/schedules/now/trigger")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["type"], job["status"], job["input"]) == ("square_sum", "queued", {"data": [1, 2, 3]})
    assert job["metadata"] == {"schedule_id": "now"}
    await drain()
    done = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert (done["status"], (await client.get(f"/v1/jobs/{job['id']}/result")).json()) == ("succeeded", 14)
    after = (await client.get("/v1/schedules/now")).json()
    assert after["last_job_id"] == job["id"] and after["last_run_at"] is not None
    await client.patch("/v1/schedules/now", json={"paused": False})
    assert before["next_run_at"] is not None


# -- the ticker -------------------------------------------------------------------------------------


@pytest.fixture
async def second_worker(config: Config) -> AsyncIterator[Deps]:
    """Another worker's connections to the same stores: its own pool, its own sessions."""
    async with connect(config) as deps:
        yield deps


async def test_two_tickers_racing_make_exactly_one_job_per_tick(
    client: httpx.AsyncClient, deps: Deps, second_worker: Deps, job_types: Any
) -> None:
    await create(client, id="race")
    await due_at(deps, "race", T)
    for n in range(4):
        now = T + n * FIVE + timedelta(seconds=1)
        await asyncio.gather(*(tick(d, job_types, now=now) for d in (deps, second_worker, deps, second_worker)))
        made = await jobs_of(deps, "race")
        assert [m["metadata"] for m in made] == [
            f'{{"schedule_id": "race", "scheduled_for": "{iso(T + i * FIVE)}"}}' for i in range(n + 1)
        ]
    schedule = (await client.get("/v1/schedules/race")).json()
    assert parse(schedule["next_run_at"]) == T + 4 * FIVE and parse(schedule["last_run_at"]) == T + 3 * FIVE
    assert schedule["last_job_id"] == str(made[-1]["id"])


async def test_a_tick_already_run_makes_no_second_job_whatever_its_schedule_says(
    client: httpx.AsyncClient, deps: Deps, job_types: Any
) -> None:
    await create(client, id="once")
    await due_at(deps, "once", T)
    await tick(deps, job_types, now=T)
    await due_at(deps, "once", T)  # as if the advance had been lost: the tick's Idempotency-Key still holds
    assert await tick(deps, job_types, now=T) == 1
    made = await jobs_of(deps, "once")
    assert [m["idempotency_key"] for m in made] == [f"schedule once {iso(T)}"]
    assert parse((await client.get("/v1/schedules/once")).json()["next_run_at"]) == T + FIVE


async def test_ticks_missed_while_nothing_ran_make_one_job_for_the_latest(
    client: httpx.AsyncClient, deps: Deps, job_types: Any
) -> None:
    await create(client, id="late")
    await due_at(deps, "late", T)
    await tick(deps, job_types, now=T + timedelta(hours=1, minutes=2, seconds=30))  # 13 ticks missed
    made = await jobs_of(deps, "late")
    assert [m["metadata"] for m in made] == [f'{{"schedule_id": "late", "scheduled_for": "{iso(T + 12 * FIVE)}"}}']
    assert parse((await client.get("/v1/schedules/late")).json()["next_run_at"]) == T + 13 * FIVE


async def test_a_paused_schedule_makes_no_job(client: httpx.AsyncClient, deps: Deps, job_types: Any) -> None:
    await create(client, id="asleep")
    await client.patch("/v1/schedules/asleep", json={"paused": True})
    assert await tick(deps, job_types, now=datetime.now(UTC) + timedelta(days=30)) == 0
    assert await jobs_of(deps, "asleep") == []


async def test_a_ticks_job_is_rung_and_runs(
    client: httpx.AsyncClient, deps: Deps, job_types: Any, drain: Callable[[], Awaitable[None]]
) -> None:
    await create(client, id="runs")
    await due_at(deps, "runs", T)
    await tick(deps, job_types, now=T)
    await drain()  # a burst worker: it runs only what the doorbell rang
    [made] = await jobs_of(deps, "runs")
    assert (await job_row(deps, made["id"]))["status"] == "succeeded"


async def test_the_workers_ticker_makes_the_job_of_a_due_schedule(
    client: httpx.AsyncClient, deps: Deps, job_types: Any
) -> None:
    await create(client, id="looped")
    await due_at(deps, "looped", datetime.now(UTC) - timedelta(minutes=1))
    async with notify.hearing(deps) as ear, ticking(deps, ear, job_types):

        async def made() -> list[dict[str, Any]] | None:
            return await jobs_of(deps, "looped") or None

        assert len(await eventually(made)) == 1
    assert parse((await client.get("/v1/schedules/looped")).json()["next_run_at"]) > datetime.now(UTC)


async def test_a_schedule_resumed_a_second_before_its_tick_wakes_the_ticker_asleep_without_one(
    client: httpx.AsyncClient, deps: Deps, job_types: Any
) -> None:
    await create(client, id="soon", paused=True)
    async with notify.hearing(deps) as ear, ticking(deps, ear, job_types):

        async def asleep() -> bool | None:
            alarms = ear.alarms.get(notify.SCHEDULES, [])  # no schedule will run: it sleeps its longest
            return (ear.listening and [a.at for a in alarms] == [math.inf]) or None

        await eventually(asleep)
        # as a resume does, its tick a second away; unwoken, the ticker would look again in notify.IDLE_S
        await deps.db.execute("UPDATE schedules SET paused = false, next_run_at = now() + interval '1 second'")

        async def made() -> list[dict[str, Any]] | None:
            return await jobs_of(deps, "soon") or None

        assert len(await eventually(made)) == 1


# -- declared in code -------------------------------------------------------------------------------


async def test_declared_schedules_are_written_and_those_no_longer_declared_are_deleted(
    client: httpx.AsyncClient, deps: Deps, job_types: Any
) -> None:
    declared = schedules.declared("tests.scheduled", job_types)
    await schedules.sync_declared(deps.db, declared)
    [nightly] = (await client.get("/v1/schedules")).json()["items"]  # tenant default's; acme's is acme's
    assert (nightly["id"], nightly["declared"], nightly["timezone"]) == ("nightly-sums", True, "Europe/Paris")
    assert await schedules.get(deps.db, "acme", "acme-sleep") is not None
    refused = await client.patch("/v1/schedules/nightly-sums", json={"cron": "* * * * *"})
    assert refused.status_code == 409 and refused.json()["errors"][0]["loc"] == "$.cron"
    assert (await client.delete("/v1/schedules/nightly-sums")).status_code == 409
    assert (await client.patch("/v1/schedules/nightly-sums", json={"paused": True})).status_code == 200
    await schedules.sync_declared(deps.db, declared)  # a worker's restart keeps the pause
    assert (await client.get("/v1/schedules/nightly-sums")).json()["paused"] is True
    await schedules.sync_declared(deps.db, [])
    assert await deps.db.fetch_val("SELECT count(*) FROM schedules") == 0


async def test_a_declared_schedule_keeps_its_next_run_across_starts_unless_its_cron_changed(
    deps: Deps, job_types: Any
) -> None:
    declared = schedules.declared("tests.scheduled", job_types)
    await schedules.sync_declared(deps.db, declared)
    await due_at(deps, "nightly-sums", T)  # every worker was down since T: the next start still runs it, once
    await schedules.sync_declared(deps.db, declared)
    row = await schedules.get(deps.db, "default", "nightly-sums")
    assert row is not None and row.next_run_at == T
    moved = Schedule(id="nightly-sums", cron="0 4 * * *", timezone="Europe/Paris", type="square_sum",
                     input={"data": [1, 2]})  # fmt: skip
    await schedules.sync_declared(deps.db, schedules.declared(module_with("tests_moved", moved), job_types))
    row = await schedules.get(deps.db, "default", "nightly-sums")
    assert row is not None and row.cron == "0 4 * * *" and row.next_run_at is not None
    assert row.next_run_at > datetime.now(UTC) and row.next_run_at.astimezone(cron.zone("Europe/Paris")).hour == 4


def module_with(name: str, *declared: Any) -> str:
    module = types.ModuleType(name)
    module.SCHEDULES = list(declared)  # type: ignore[attr-defined]
    sys.modules[name] = module
    return name


@pytest.mark.parametrize(
    ("schedule", "says"),
    [
        (Schedule(id="bad-cron", cron="every night", type="square_sum", input={"data": [1]}), "bad-cron"),
        (Schedule(id="bad-zone", cron="0 3 * * *", timezone="Paris", type="square_sum", input={"data": [1]}), "zone"),
        (Schedule(id="bad-type", cron="0 3 * * *", type="nope"), "unknown job type 'nope'"),
        (Schedule(id="bad-input", cron="0 3 * * *", type="square_sum", input={"data": "x"}), "bad-input"),
        (Schedule(id="bad id", cron="0 3 * * *", type="square_sum", input={"data": [1]}), "an id is"),
        (Schedule(id="t", cron="0 3 * * *", type="square_sum", input={"data": [1]}, tenant="Acme Inc"), "tenant"),
    ],
)
def test_a_bad_declared_schedule_stops_the_start_naming_it(schedule: Schedule, says: str, job_types: Any) -> None:
    with pytest.raises(RuntimeError, match=says):
        schedules.declared(module_with(f"tests_bad_{abs(hash(schedule.id))}", schedule), job_types)


def test_a_schedule_declared_twice_stops_the_start(job_types: Any) -> None:
    twice = Schedule(id="twin", cron="0 3 * * *", type="square_sum", input={"data": [1]})
    with pytest.raises(RuntimeError, match="declared twice: default/twin"):
        schedules.declared(module_with("tests_twice", twice, twice), job_types)


@pytest.mark.slow
async def test_a_worker_process_writes_its_modules_schedules_and_runs_their_ticks(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    scheduled = deployment_config(config.database_url, config.redis_url, job_modules="tests.jobs,tests.scheduled")
    procs = Processes(process_env(scheduled), tmp_path, api_key)
    procs.start_worker()
    try:

        async def written() -> schedules.ScheduleRow | None:
            return await schedules.get(deps.db, "default", "nightly-sums")

        await eventually(written, within=30)
        await due_at(deps, "nightly-sums", datetime.now(UTC) - timedelta(minutes=1))

        async def ran() -> list[dict[str, Any]] | None:
            made = await jobs_of(deps, "nightly-sums")
            return made if made and made[0]["status"] == "succeeded" else None

        assert len(await eventually(ran, within=30)) == 1
    finally:
        procs.stop()
