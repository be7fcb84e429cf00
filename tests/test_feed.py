"""GET /v1/events: the tenant's job changes, in order, resumable with Last-Event-ID, filtered, one tenant's only; and
the log under it never skips a change that commits late."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import msgspec
import pytest

from tests.conftest import bearer, eventually
from tests.sse import Live, live_server
from worker import Config, Deps, feed, keys

Drain = Callable[[], Awaitable[None]]
SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}


@pytest.fixture
async def live(config: Config, deps: Deps) -> AsyncIterator[Live]:
    fast = msgspec.structs.replace(config, stream_keepalive_s=1.0, events_poll_s=0.5)
    async with live_server(fast) as server:
        yield server


class Feed:
    """An open /v1/events stream: its frames as (id, event, data) as they come."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[tuple[str | None, str | None, Any]] = asyncio.Queue()
        self.last_id: str | None = None
        self.job_event_id: str | None = None  # the last `job` event's that job() returned

    async def job(self, within: float = 15.0) -> dict[str, Any]:
        """The next `job` event's data."""
        async with asyncio.timeout(within):
            while True:
                event_id, event, data = await self.frames.get()
                if event == "job":
                    self.job_event_id = event_id
                    job: dict[str, Any] = data
                    return job

    async def jobs_until(self, check: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        seen = []
        while not check(job := await self.job()):
            seen.append(job)
        return [*seen, job]


@contextlib.asynccontextmanager
async def following(
    live: Live, *, key: str | None = None, last_event_id: str | None = None, query: str = "", dashboard: bool = False
) -> AsyncIterator[Feed]:
    """/v1/events with a key, or with `dashboard` the dashboard's /ui/events with a session signed in with it."""
    headers = {} if dashboard else bearer(key or live.key)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    opened = Feed()
    async with httpx.AsyncClient(base_url=live.url, timeout=30.0) as client:
        if dashboard:
            signed = await client.post("/ui/login", data={"key": key or live.key, "next": "/ui/"})
            assert signed.status_code == 303, signed.text
        path = "/ui/events" if dashboard else "/v1/events"
        async with client.stream("GET", f"{path}{query}", headers=headers) as response:
            assert response.status_code == 200, await response.aread()

            async def read() -> None:
                fields: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        continue
                    if line:
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
                        continue
                    if "id" in fields:
                        opened.last_id = fields["id"]
                    if fields:
                        data = msgspec.json.decode(fields["data"]) if "data" in fields else None
                        await opened.frames.put((fields.get("id"), fields.get("event"), data))
                    fields = {}

            reader = asyncio.create_task(read())
            try:
                await eventually(lambda: asyncio.sleep(0, opened.last_id))  # the stream's first line: its place
                yield opened
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await reader


async def submit(client: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    response = await client.post("/v1/jobs", json=body or SQUARES)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def test_the_feed_shows_each_submitted_job_and_its_end_as_get_does_without_input_or_result(
    live: Live, drain: Drain
) -> None:
    async with live.client() as client, following(live) as stream:
        job_id = await submit(client, {**SQUARES, "metadata": {"customer": "acme"}})
        queued = await stream.job()
        assert (queued["id"], queued["status"], queued["type"]) == (job_id, "queued", "square_sum")
        assert "input" not in queued and "result" not in queued
        await drain()
        ended = (await stream.jobs_until(lambda job: job["status"] == "succeeded"))[-1]
        shown = (await client.get(f"/v1/jobs/{job_id}")).json()
    # Every field, timestamps to the character: the feed's JSON comes from PostgreSQL, GET's from Python. The links
    # alone differ: GET signs a read token into each, the feed (a key's, never a token's) needs none.
    assert {**ended, "links": None} == {**{name: shown[name] for name in ended}, "links": None}
    assert ended["links"]["self"] == f"/v1/jobs/{job_id}" == shown["links"]["self"].partition("?")[0]
    assert ended["done"] is True and ended["metadata"] == {"customer": "acme"} and ended["finished_at"] is not None
    assert set(shown) - set(ended) >= {"input", "result"}


async def test_a_stream_resumed_with_last_event_id_gets_only_the_changes_after_it(live: Live) -> None:
    async with live.client() as client:
        async with following(live) as stream:
            first = await submit(client)
            assert (await stream.job())["id"] == first
            resume_at = stream.last_id
        second = await submit(client)  # while no stream is open
        assert resume_at is not None
        async with following(live, last_event_id=resume_at) as resumed:
            job = await resumed.job()
            assert job["id"] == second, "the change before Last-Event-ID came again, or the one after it was lost"


async def test_filters_show_only_the_changes_of_that_type_and_status(live: Live, drain: Drain) -> None:
    async with live.client() as client, following(live, query="?type=cube_sum&status=succeeded") as stream:
        await submit(client)  # square_sum: never shown
        cubes = await submit(client, {"type": "cube_sum", "input": {"data": [2]}})
        await drain()
        job = await stream.job()
        assert (job["id"], job["type"], job["status"]) == (cubes, "cube_sum", "succeeded")


async def test_another_tenants_changes_never_reach_the_feed(live: Live, deps: Deps) -> None:
    other = await keys.create(deps.db, "other", "feed")
    async with live.client() as mine, following(live) as stream:
        async with httpx.AsyncClient(base_url=live.url, headers=bearer(other)) as theirs:
            await submit(theirs)
        own = await submit(mine)
        assert (await stream.job())["id"] == own


@pytest.mark.parametrize(
    ("headers", "query", "field"),
    [
        ({"Last-Event-ID": "12"}, "", "Last-Event-ID"),
        ({"Last-Event-ID": "1.x"}, "", "Last-Event-ID"),
        ({}, "?status=sleeping", "status"),
        ({}, "?type=a&type=b", "type"),
    ],
)
async def test_a_bad_last_event_id_or_filter_is_a_422_naming_it(
    client: httpx.AsyncClient, headers: dict[str, str], query: str, field: str
) -> None:
    response = await client.get(f"/v1/events{query}", headers=headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert field in response.text


async def test_a_job_read_token_does_not_open_the_tenant_feed(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/jobs", json=SQUARES)).json()
    token = job["links"]["self"].partition("?token=")[2]
    async with httpx.AsyncClient(transport=client._transport, base_url="http://test") as anonymous:
        response = await anonymous.get(f"/v1/events?token={token}")
    assert response.status_code == 401


async def test_the_dashboards_stream_sends_a_job_that_changed_between_its_wakes_once_at_its_latest_state(
    live: Live, drain: Drain
) -> None:
    async with live.client() as client, following(live) as every:
        start = every.last_id
        job_id = await submit(client)
        assert (await every.job())["status"] == "queued"
        await drain()
        changes = await every.jobs_until(lambda job: job["status"] == "succeeded")
        assert all(job["id"] == job_id for job in changes)
        # The job's queued and later states are separate changes of the process's feed now; a dashboard that
        # resumes from before them gets the job once, ended, as a row.
        async with following(live, last_event_id=start, dashboard=True) as dashboard:
            row = await dashboard.job()
            assert (row["id"], row["status"], row["done"]) == (job_id, "succeeded", True)
            assert set(row) == {"id", "type", "status", "done", "progress", "attempt", "max_attempts"}
            assert dashboard.job_event_id == every.job_event_id, "the row's id is not where the job last changed"
            later = await submit(client)
            assert (await dashboard.job())["id"] == later, "the job came to the dashboard twice"


async def test_the_dashboards_stream_never_loses_a_jobs_end(live: Live, drain: Drain) -> None:
    async with live.client() as client, following(live, dashboard=True) as dashboard:
        ended = {await submit(client): "succeeded" for _ in range(20)}
        ended |= {await submit(client, {"type": "explode", "input": {}}): "failed" for _ in range(5)}
        cancelled = [await submit(client) for _ in range(5)]
        for job_id in cancelled:
            assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
        ended |= dict.fromkeys(cancelled, "cancelled")
        await drain()
        latest: dict[str, str] = {}
        while any(latest.get(job_id) != status for job_id, status in ended.items()):
            job = await dashboard.job()  # a job's end lost: no more events, and this times out
            latest[job["id"]] = job["status"]
        assert latest == ended


async def test_a_read_of_a_full_batch_ends_at_its_last_change_and_the_next_reads_on(
    deps: Deps, client: httpx.AsyncClient
) -> None:
    start = await feed.boundary(deps.db)
    made = [UUID(await submit(client)) for _ in range(3)]
    first = await feed.read_after(deps.db, "default", start, limit=2)
    assert first.full and first.high == first.changes[-1].cursor
    rest = await feed.read_after(deps.db, "default", first.high, limit=2)
    assert not rest.full
    assert [c.job.id for c in first.changes + rest.changes] == made


async def test_a_change_committed_late_is_read_after_the_changes_that_committed_before_it(
    deps: Deps, client: httpx.AsyncClient, pg_connection: asyncpg.Connection
) -> None:
    early, late = UUID(await submit(client)), UUID(await submit(client))
    start = await feed.boundary(deps.db)
    transaction = pg_connection.transaction()
    await transaction.start()
    # The older transaction changes `early` and stays open while a newer one changes `late` and commits.
    await pg_connection.execute("UPDATE jobs SET progress = '{\"fraction\": 0.5}' WHERE id = $1", early)
    await deps.db.execute("UPDATE jobs SET progress = '{\"fraction\": 0.7}' WHERE id = :id", {"id": late})
    batch = await feed.read_after(deps.db, "default", start)
    assert batch.changes == [], "a reader went past a change whose transaction was still open"
    await transaction.commit()
    batch = await feed.read_after(deps.db, "default", batch.high)
    assert [c.job.id for c in batch.changes] == [early, late]
    assert (await feed.read_after(deps.db, "default", batch.high)).changes == []


async def test_follow_false_replays_the_changes_after_last_event_id_and_ends_where_to_resume(
    client: httpx.AsyncClient,
) -> None:
    start = (await client.get("/v1/events?follow=false")).text.strip()
    assert start.startswith("id: ")
    job_id = await submit(client)
    response = await client.get("/v1/events?follow=false", headers={"Last-Event-ID": start.removeprefix("id: ")})
    assert response.status_code == 200
    blocks = response.text.strip().split("\n\n")
    assert f'"id":"{job_id}"' in blocks[0] and "event: job" in blocks[0]
    assert blocks[-1].startswith("id: ") and "\n" not in blocks[-1]


async def replayed(client: httpx.AsyncClient, query: str, last_event_id: str) -> list[tuple[str, Any]]:
    """The (event, data) frames of a follow=false read of the dashboard's stream after `last_event_id`."""
    response = await client.get(f"/ui/events?follow=false&{query}", headers={"Last-Event-ID": last_event_id})
    assert response.status_code == 200, response.text
    frames = []
    for block in response.text.split("\n\n"):
        fields = dict(line.partition(": ")[::2] for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            frames.append((fields["event"], msgspec.json.decode(fields["data"])))
    return frames


async def test_a_pages_stream_sends_its_own_rows_and_one_others_event_naming_the_jobs_its_filters_match(
    live: Live, drain: Drain
) -> None:
    async with live.client() as api, httpx.AsyncClient(base_url=live.url) as browser:
        assert (await browser.post("/ui/login", data={"key": live.key, "next": "/ui/"})).status_code == 303
        start = (await browser.get("/ui/events?follow=false")).text.strip().removeprefix("id: ")
        row, other = await submit(api), await submit(api)
        await submit(api, {"type": "explode", "input": {}})  # changes, but its type is not the filter's
        await drain()
        frames = await replayed(browser, f"rows={row}&type=square_sum", start)
    rows = [data for event, data in frames if event == "job"]
    others = [data for event, data in frames if event == "others"]
    assert {job["id"] for job in rows} == {row}, "a job not on the page was sent as a row"
    assert rows[-1]["status"] == "succeeded"
    assert {job_id for data in others for job_id in data["ids"]} == {other}, "others names the rest its filter matches"
    assert sum(data["changed"] for data in others) >= 2  # other and the explode job, each at least once


async def test_the_overviews_stream_follows_no_rows_and_gets_one_small_event_a_wake(live: Live) -> None:
    async with live.client() as api, httpx.AsyncClient(base_url=live.url) as browser:
        assert (await browser.post("/ui/login", data={"key": live.key, "next": "/ui/"})).status_code == 303
        start = (await browser.get("/ui/events?follow=false")).text.strip().removeprefix("id: ")
        for _ in range(3):
            await submit(api)
        frames = await replayed(browser, "rows=", start)
    assert [(event, data["changed"], len(data["ids"])) for event, data in frames] == [("others", 3, 3)]


@pytest.mark.parametrize("rows", ["not-an-id", ",".join(str(UUID(int=i)) for i in range(101))])
async def test_a_pages_stream_with_bad_rows_is_a_422_naming_them(live: Live, rows: str) -> None:
    async with httpx.AsyncClient(base_url=live.url) as browser:
        assert (await browser.post("/ui/login", data={"key": live.key, "next": "/ui/"})).status_code == 303
        response = await browser.get("/ui/events", params={"rows": rows})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "rows" in response.text
