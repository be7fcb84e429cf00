"""GET /v1/jobs/{id}/events: replay, Last-Event-ID, follow, the end of a stream, and what it costs to hold one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import msgspec
import pytest
from databases import Database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import engine
from tests.conftest import eventually, free_port, notified
from tests.engine import beat
from tests.sse import Frame, Live, RawStream, live_server, read_stream
from worker import Config, Deps, Progress, events, status, store
from worker.sweep import sweep_once
from worker.tools.embedded import EmbeddedValkey

Drain = Callable[[], Awaitable[None]]
SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}


async def submit(client: httpx.AsyncClient, body: dict[str, Any] | None = None, **extra: Any) -> str:
    response = await client.post("/v1/jobs", json={**(body or SQUARES), **extra})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@pytest.fixture
async def live(config: Config, deps: Deps) -> AsyncIterator[Live]:
    # Short intervals so that fallbacks show up quickly; the behaviour under test never waits on them.
    fast = msgspec.structs.replace(config, stream_keepalive_s=5.0, events_poll_s=0.5)
    async with live_server(fast) as server:
        yield server


# -- replay -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["0193b7c2-5f1e-7c3a-9d2e-8f0a1b2c3d4e", "not-a-uuid", "1234"])
async def test_events_of_an_unknown_or_malformed_id_are_a_404_problem_not_a_stream(
    client: httpx.AsyncClient, job_id: str
) -> None:
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/not-found"


async def test_a_finished_job_replays_its_whole_log_and_the_stream_closes(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, {"type": "sleep", "input": {"seconds": 0.3, "steps": 3}})
    await drain()
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    stream = _parse(response.text)
    assert [f.id for f in stream] == list(range(1, len(stream) + 1))
    names = [(f.event, f.data.get("status")) for f in stream]
    assert names[:2] == [("status", "queued"), ("status", "running")]
    assert names[-1] == ("status", "succeeded")
    assert ("log", None) in names and ("progress", None) in names
    log = next(f.data for f in stream if f.event == "log")
    assert log == {"level": "info", "message": "sleeping 0.3 s in 3 steps"}
    # The terminal status event is the Job itself, exactly as GET answers it now.
    assert stream[-1].data == (await client.get(f"/v1/jobs/{job_id}")).json()


async def test_replayed_status_events_show_the_job_as_it_was_then(client: httpx.AsyncClient, drain: Drain) -> None:
    job_id = await submit(client, {"type": "flaky", "input": {"failures": 1}})
    await drain()
    response = await client.get(f"/v1/jobs/{job_id}/events")
    statuses = [f.data for f in _parse(response.text) if f.event == "status"]
    queued, running, retry, again, succeeded = statuses
    assert queued["status"] == "queued" and queued["attempt"] == 0 and queued["started_at"] is None
    assert running["status"] == "running" and running["attempt"] == 1 and running["started_at"] is not None
    assert not running["done"] and running["result"] is None and running["finished_at"] is None
    # A retry: the Job as GET showed it (no error while queued), and why and when it runs again.
    assert retry["status"] == "queued" and retry["error"] is None and retry["attempt"] == 1
    assert retry["retry"]["error"]["type"] == "retryable_error" and retry["retry"]["next_run_at"]
    assert again["status"] == "running" and again["attempt"] == 2 and "retry" not in again
    assert succeeded["done"] and succeeded["result"] == {"attempts": 2} and succeeded["finished_at"]
    assert succeeded["progress"]["fraction"] == 1.0 and queued["progress"]["fraction"] == 0.0
    assert all(s["input"] == {"failures": 1} and s["id"] == job_id for s in statuses)


def _parse(text: str) -> list[Frame]:
    from tests.sse import parse

    return [parse(block.splitlines()) for block in text.split("\n\n") if block.strip()]


async def test_last_event_id_resumes_after_that_event_and_after_the_end_answers_204(
    client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, {"type": "sleep", "input": {"seconds": 0.2, "steps": 2}})
    await drain()
    whole = _parse((await client.get(f"/v1/jobs/{job_id}/events")).text)
    for last in range(len(whole)):
        rest = _parse((await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last)})).text)
        assert rest == whole[last:]
    # Past the terminal event there is nothing, ever: 204 tells EventSource to stop reconnecting.
    done = await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(len(whole))})
    assert done.status_code == 204 and done.content == b""


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999"])
async def test_a_malformed_last_event_id_is_a_422_naming_the_header(client: httpx.AsyncClient, value: str) -> None:
    job_id = await submit(client)
    response = await client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": value})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == "Last-Event-ID"


# -- follow -----------------------------------------------------------------------------------------


async def test_a_stream_follows_a_running_job_live_to_its_terminal_event(live: Live, drain: Drain) -> None:
    async with live.client() as client:
        job_id = await submit(client, {"type": "sleep", "input": {"seconds": 0.6, "steps": 3}})
        reading = asyncio.create_task(read_stream(client, job_id))
        await eventually(lambda: _following(live, job_id))  # the stream replayed, and waits for more
        await drain()
        stream = await asyncio.wait_for(reading, 30)
    assert [f.id for f in stream] == list(range(1, len(stream) + 1))
    assert stream[-1].event == "status" and stream[-1].data["status"] == "succeeded"
    assert any(f.event == "progress" for f in stream) and any(f.event == "log" for f in stream)


async def _following(live: Live, job_id: str) -> bool | None:
    return live.app.state.web.hub.following(UUID(job_id)) or None


async def _claimed_job(deps: Deps) -> UUID:
    """A running job driven by the test itself, as a worker would drive it."""
    from tests.test_store import new_job

    job_id = await new_job(deps.db)
    assert await engine.claim_one(deps.jobs, job_id, 0, owner="test", lease_s=60) is not None
    await notified(deps, job_id)
    return job_id


async def _append(deps: Deps, job_id: UUID, n: int, *, start: int = 0) -> None:
    """n more events, progress and log lines mixed, each published as the worker does."""
    for i in range(start, start + n):
        if i % 2:
            await beat(deps.jobs, job_id, 1, lease_s=60, progress=Progress(i / 1000, f"step {i}"))
        else:
            await beat(deps.jobs, job_id, 1, lease_s=60, logs=[("info", f"line {i}")])
        await notified(deps, job_id)


async def _whole_log(deps: Deps, job_id: UUID) -> list[tuple[int, str]]:
    return [(e.seq, e.name) for e in await events.read_after(deps.db, job_id, 0, limit=10_000)]


async def _cancel(deps: Deps, job_id: UUID) -> None:
    """Cancel a queued job the way a guarded transition does it, with its status event, then publish."""
    statement = f"""
WITH moved AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now(), event_seq = event_seq + 1,
                    error = '{{"type": "cancelled", "message": "cancelled on request", "retryable": false}}'
     WHERE id = :id AND status = 'queued'
    RETURNING *
), event AS ({status.insert_sql("moved")})
SELECT id FROM moved
"""
    assert await deps.db.fetch_one(statement, {"id": job_id}) is not None
    await notified(deps, job_id)


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancelled", "expired"])
async def test_the_terminal_status_event_is_delivered_however_the_job_ends(
    live: Live, deps: Deps, drain: Drain, outcome: str
) -> None:
    async with live.client() as client:
        job_id = await submit(client, {"type": "refuse", "input": {}} if outcome == "failed" else SQUARES)
        reading = asyncio.create_task(read_stream(client, job_id))
        await eventually(lambda: _following(live, job_id))
        if outcome in ("succeeded", "failed"):
            await drain()
        elif outcome == "cancelled":
            await _cancel(deps, UUID(job_id))
        else:
            await deps.db.execute("UPDATE jobs SET expires_at = now() WHERE id = :id", {"id": UUID(job_id)})
            await sweep_once(deps)
        stream = await asyncio.wait_for(reading, 30)
        final = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert stream[-1].event == "status" and stream[-1].data == final
    assert final["status"] == outcome and final["done"]
    assert [f.data["status"] for f in stream if f.event == "status"].count(outcome) == 1


async def test_an_idle_stream_gets_a_keep_alive_comment(config: Config, deps: Deps) -> None:
    async with live_server(msgspec.structs.replace(config, stream_keepalive_s=0.05)) as live:
        async with live.client() as client:
            job_id = await submit(client)
        stream = await live.open_stream(job_id)
        assert (await stream.next_frame()) == Frame("status", (await stream_job(live, job_id)), 1)
        while (chunk := await stream._chunk()) is not None and not chunk.startswith(":"):
            pass
        assert chunk == ": keep-alive\n\n"
        await stream.close()


async def stream_job(live: Live, job_id: str) -> Any:
    async with live.client() as client:
        return (await client.get(f"/v1/jobs/{job_id}")).json()


async def test_a_stream_past_its_lifetime_ends_with_a_reconnect_event_and_resumes_without_a_gap(
    config: Config, deps: Deps
) -> None:
    async with live_server(msgspec.structs.replace(config, stream_max_s=0.2)) as live:
        job_id = await _claimed_job(deps)
        seen: list[Frame] = []
        reconnects = 0
        while not (seen and seen[-1].data.get("done")):
            last = seen[-1].id if seen else None
            stream = await live.open_stream(str(job_id), last_event_id=last)
            frames_ = await stream.rest()
            assert frames_[-1].event == "reconnect" or frames_[-1].data.get("done")
            if frames_[-1].event == "reconnect":
                reconnects += 1
                assert frames_[-1].id is None and frames_[-1].data == {"reason": "max-lifetime"}
                assert frames_[-1].retry is not None and frames_[-1].retry > 0
                frames_.pop()
            seen += frames_
            if reconnects == 2:
                await _append(deps, job_id, 3)
            if reconnects == 4:
                await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"1")
        assert [f.id for f in seen] == [seq for seq, _ in await _whole_log(deps, job_id)]


# -- replay correctness, as a property ---------------------------------------------------------------

# (events written before the connection, events read before disconnecting, rudely?) per connection
PLANS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6), st.booleans()), min_size=1, max_size=6)


async def test_a_read_tokens_streams_are_limited_per_job_and_leave_the_keys_own_alone(
    config: Config, deps: Deps
) -> None:
    """Every read-token stream of a tenant shared one pool: 10 streams on one leaked job link denied live streams to
    every browser of that tenant."""
    limited = msgspec.structs.replace(config, max_streams_per_key=2, max_streams_per_token=2)
    async with live_server(limited) as live, live.client() as client:
        leaked, other = [(await client.post("/v1/jobs", json={"type": "sleep"})).json() for _ in range(2)]
        held = [await RawStream.open(live.url, "", path=leaked["links"]["events"]) for _ in range(2)]
        refused, head = await RawStream.request(live.url, leaked["links"]["events"])
        assert head.startswith(b"HTTP/1.1 429"), head
        await refused.close()
        held.append(await RawStream.open(live.url, "", path=other["links"]["events"]))  # another job: its own
        held += [await live.open_stream(leaked["id"]) for _ in range(2)]  # the key's streams: its own pool
        for stream in held:
            await stream.close()


async def test_a_stream_opened_with_a_read_token_ends_when_the_token_does(config: Config, deps: Deps) -> None:
    """A stream opened with a token outlived it by up to OUTLAST_STREAM_MAX_S (30 minutes)."""
    async with live_server(msgspec.structs.replace(config, token_ttl_s=2)) as live, live.client() as client:
        job = (await client.post("/v1/jobs", json={"type": "sleep"})).json()  # no worker: it stays queued
        stream = await RawStream.open(live.url, "", path=job["links"]["events"])
        frames = await asyncio.wait_for(stream.rest(), 30)
        assert frames[-1].event == "reconnect" and frames[-1].data == {"reason": "token-expired"}, frames
        again, head = await RawStream.request(live.url, job["links"]["events"])
        assert head.startswith(b"HTTP/1.1 401"), head  # the same link again: read the job for a fresh one
        await again.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=PLANS)
async def test_reconnecting_anywhere_with_last_event_id_sees_the_whole_log_once(
    live: Live, deps: Deps, plan: list[tuple[int, int, bool]]
) -> None:
    job_id = await _claimed_job(deps)
    written, seen = 0, []
    for writes, reads, rude in plan:
        await _append(deps, job_id, writes, start=written)
        written += writes
        stream = await live.open_stream(str(job_id), last_event_id=seen[-1].id if seen else None)
        available = 2 + written - len(seen)  # queued and running, then what we wrote
        for _ in range(min(reads, available)):
            frame = await stream.next_frame()
            assert frame is not None
            seen.append(frame)
        stream.reset() if rude else await stream.close()
    await store.finish(deps.jobs, job_id, 1, "succeeded", result=b"1")
    await notified(deps, job_id)
    stream = await live.open_stream(str(job_id), last_event_id=seen[-1].id if seen else None)
    seen += await stream.rest()
    log = await _whole_log(deps, job_id)
    assert [(f.id, f.event) for f in seen] == log  # in order, no gap, no duplicate
    assert seen[-1].data["status"] == "succeeded"


# -- what a stream holds, and that it gives it all back ------------------------------------------------


async def _gauge(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


async def _db_connections(pg: Any) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"))


async def _redis_clients(redis: Any) -> int:
    return int((await redis.info("clients"))["connected_clients"])


async def _all_connections_free(db: Database, size: int) -> None:
    """Returns once `size` tasks each hold one of the pool's connections at the same time: only if none leaked."""
    together = asyncio.Barrier(size)

    async def hold() -> None:
        async with db.connection() as connection:
            await connection.raw_connection.fetchval("SELECT 1")
            await together.wait()

    await asyncio.gather(*(hold() for _ in range(size)))


@pytest.mark.slow
async def test_streams_reset_closed_or_ended_give_back_every_subscription_task_and_connection(
    config: Config, deps: Deps, pg_connection: Any, redis: Any
) -> None:
    # Fixed pools: a leaked connection then shows as one still in use, not as a grown pool.
    fixed = msgspec.structs.replace(config, db_pool_min=4, db_pool_max=4, redis_pool_max=4)
    async with live_server(fixed) as live, live.client() as client:
        ids = [await submit(client) for _ in range(8)]
        # A first burst starts sse-starlette's shutdown watcher and fills the Redis pool (stream slots use it).
        warm = await asyncio.gather(*(live.open_stream(ids[i % 8]) for i in range(50)))
        for stream in warm:
            await stream.close()
        await notified(deps, None)  # and our own Redis pool its connection
        await eventually(lambda: _unfollowed(live))
        hub, db = live.app.state.web.hub, live.app.state.web.deps.db
        baseline = (
            await _gauge(client, "outlast_open_streams"),
            await _redis_clients(redis),
            await _db_connections(pg_connection),
            len(asyncio.all_tasks()),
        )
        assert baseline[0] == 0

        streams = await asyncio.gather(*(live.open_stream(ids[i % 8]) for i in range(200)))
        for stream in streams:
            assert (await stream.next_frame()) is not None  # the replayed `queued` event
        assert await _gauge(client, "outlast_open_streams") == 200
        assert hub.followed == 8
        # One subscription per process, whatever the number of streams: no Redis connection per client.
        assert (await redis.pubsub_numsub(events.channel(redis)))[0][1] == 1
        assert await _redis_clients(redis) == baseline[1]

        for stream in streams[:100]:
            stream.reset()
        for stream in streams[100:150]:
            await stream.close()
        # The last 50 follow the two jobs that now end: the server closes those streams after the end.
        ending = streams[150:]
        for job_id in ids:
            assert await engine.claim_one(deps.jobs, UUID(job_id), 0, owner="test", lease_s=60) is not None
            assert await store.finish(deps.jobs, UUID(job_id), 1, "succeeded", result=b"14")
            await notified(deps, UUID(job_id))
        for stream in ending:
            rest = await stream.rest()
            assert rest[-1].event == "status" and rest[-1].data["result"] == 14

        async def released() -> tuple[float, int, int, int] | None:
            now = (
                await _gauge(client, "outlast_open_streams"),
                await _redis_clients(redis),
                await _db_connections(pg_connection),
                len(asyncio.all_tasks()),
            )
            return now if now == baseline and hub.followed == 0 else None

        await eventually(released)
        await asyncio.wait_for(_all_connections_free(db, 4), 10)  # no connection left checked out


async def _unfollowed(live: Live) -> bool | None:
    return live.app.state.web.hub.followed == 0 or None


@pytest.fixture
def private_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey(tmp_path / "valkey", port=free_port()) as server:
        yield server


@pytest.mark.slow
async def test_followers_miss_nothing_across_a_redis_restart(
    config: Config, deps: Deps, private_valkey: EmbeddedValkey
) -> None:
    from worker import connect

    own = msgspec.structs.replace(config, redis_url=private_valkey.url(1), events_poll_s=0.3)
    async with live_server(own) as live, connect(own) as writer:
        hub = live.app.state.web.hub
        job_id = await _claimed_job(writer)
        staying = await live.open_stream(str(job_id))  # connected throughout
        leaving = await live.open_stream(str(job_id))  # gone during the outage, back after it
        kept, left = [await staying.next_frame(), await staying.next_frame()], [await leaving.next_frame()]
        await _append(writer, job_id, 2)
        kept += [await staying.next_frame(), await staying.next_frame()]

        private_valkey.stop()
        await eventually(lambda: _unsubscribed(hub))
        await _append(writer, job_id, 3, start=2)  # published into the void: followers read the log anyway
        kept += [await staying.next_frame() for _ in range(3)]
        left += [await leaving.next_frame() for _ in range(4)]
        leaving.reset()

        private_valkey.start()
        await eventually(lambda: _subscribed(hub))
        await _append(writer, job_id, 2, start=5)
        assert await store.finish(writer.jobs, job_id, 1, "succeeded", result=b"1")
        await notified(writer, job_id)
        kept += await staying.rest()
        back = await live.open_stream(str(job_id), last_event_id=left[-1].id)  # type: ignore[union-attr]
        left += await back.rest()
    log = await _whole_log(deps, job_id)
    for seen in (kept, left):
        assert [(f.id, f.event) for f in seen if f is not None] == log


async def _unsubscribed(hub: Any) -> bool | None:
    return not hub.subscribed or None


async def _subscribed(hub: Any) -> bool | None:
    return hub.subscribed or None
