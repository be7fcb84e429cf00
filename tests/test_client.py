"""outlast_client (client/): Client and AsyncClient against a real server (uvicorn over TCP, in this loop) and a
real worker, through a TCP proxy the tests cut: resumed streams, retried submits, long waits, typed errors, and the
client's own copy of the Job kept in step with the server's."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import msgspec
import pytest

import outlast_client
from outlast_client import (
    AsyncClient,
    Client,
    Conflict,
    Event,
    IdempotencyKeyReused,
    InvalidInput,
    JobFailed,
    JobNotDone,
    JobSpec,
    NotFound,
    ProgressEvent,
    RateLimited,
    StatusEvent,
    StepSpec,
    Unauthorized,
    UnknownJobType,
)
from server.submit import BatchItem, SubmitJob
from tests.conftest import ROOT, Processes, eventually, free_port
from tests.sse import Live, live_server, read_stream
from worker import Config, Deps
from worker.job import Job as ServerJob

Drain = Callable[[], Coroutine[Any, Any, None]]
SLEEP = {"seconds": 1.0, "steps": 4}


@pytest.fixture
async def live(config: Config, deps: Deps) -> AsyncIterator[Live]:
    fast = msgspec.structs.replace(
        config,
        stream_keepalive_s=5.0,
        events_poll_s=0.5,
        allowed_callback_networks="127.0.0.1/32",  # so that a submit may name a callback_url here
        allow_http_callbacks=True,
        callback_ports="1024-65535",
    )
    async with live_server(fast) as server:
        yield server


class Proxy:
    """A TCP proxy in front of the live server, which the tests break as a network does: `cut()` resets every open
    connection at once; `drop_next_answer` drops the next answer the server writes (the request was served, its
    answer is lost) and resets that connection."""

    def __init__(self, upstream: str) -> None:
        self.upstream_port = int(upstream.rpartition(":")[2])
        self.connections = 0
        self.drop_next_answer = False
        self.sent = bytearray()  # every byte clients sent through the proxy
        self._open: set[asyncio.StreamWriter] = set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            self.cut()
            await server.wait_closed()

    def last_event_ids(self) -> list[int]:
        return [int(n) for n in re.findall(rb"(?im)^last-event-id: *(\d+)\r$", bytes(self.sent))]

    def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pair = (writer, up_writer)
        self._open.update(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair, answers=True))
        finally:
            self._open.difference_update(pair)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, ...],
        *,
        answers: bool = False,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if answers and self.drop_next_answer:
                    self.drop_next_answer = False
                    break
                if not answers:
                    self.sent += chunk
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            for end in pair:
                end.transport.abort()


@pytest.fixture
async def proxy(live: Live) -> AsyncIterator[tuple[Proxy, str]]:
    proxy = Proxy(live.url)
    async with proxy.serving() as url:
        yield proxy, url


async def follow(
    kind: str, url: str, key: str, job_id: str, on_event: Callable[[Event], None] = lambda e: None
) -> list[Event]:
    """Every event `stream()` yields, by the async or the sync client (in a thread); `on_event` runs in this loop."""
    if kind == "async":
        found = []
        async with AsyncClient(url, api_key=key) as outlast:
            async for event in outlast.stream(job_id):
                found.append(event)
                on_event(event)
        return found
    loop = asyncio.get_running_loop()

    def run() -> list[Event]:
        with Client(url, api_key=key) as outlast:
            seen = []
            for event in outlast.stream(job_id):
                seen.append(event)
                loop.call_soon_threadsafe(on_event, event)
            return seen

    return await asyncio.to_thread(run)


# -- the round trip, and the copy of the Job ---------------------------------------------------------------------


async def test_the_sync_client_submits_with_every_field_waits_and_reads_the_result(live: Live, drain: Drain) -> None:
    callback = f"http://127.0.0.1:{free_port()}/hook"

    def submit() -> outlast_client.Job:
        with Client(live.url, api_key=live.key) as outlast:
            return outlast.submit(
                "square_sum",
                {"data": [1, 2, 3]},
                callback_url=callback,
                metadata={"order": 42},
                timeout_s=30,
                max_attempts=2,
                idempotency_key="order-42",
            )

    job = await asyncio.to_thread(submit)
    assert (job.status, job.done, job.input, job.metadata) == ("queued", False, {"data": [1, 2, 3]}, {"order": 42})
    assert (job.callback_url, job.timeout_s, job.max_attempts) == (callback, 30, 2)
    assert (await asyncio.to_thread(submit)).id == job.id  # the same key: the same job
    await drain()

    def finish() -> tuple[outlast_client.Job, Any]:
        with Client(live.url, api_key=live.key) as outlast:
            return outlast.wait(job.id), outlast.result(job.id)

    done, result = await asyncio.to_thread(finish)
    assert (done.status, done.result, result) == ("succeeded", 14, 14)


async def test_a_short_job_submitted_with_wait_s_comes_back_finished_in_one_call(live: Live, drain: Drain) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        submitting = asyncio.create_task(outlast.submit("square_sum", {"data": [3]}, wait_s=30))
        await eventually(lambda: _queued(live))
        await drain()
        job = await submitting
    assert (job.status, job.result) == ("succeeded", 9)


async def _queued(live: Live) -> bool | None:
    async with live.client() as http:
        return bool((await http.get("/v1/jobs")).json()["items"]) or None


async def test_the_clients_job_decodes_every_field_the_server_sends(live: Live, drain: Drain) -> None:
    """The client keeps its own copy of the Job (it never imports the server): any field the server adds, renames
    or retypes fails here until the copy follows."""
    assert {f.name for f in msgspec.structs.fields(outlast_client.Job)} == {
        f.name for f in msgspec.structs.fields(ServerJob)
    }
    async with AsyncClient(live.url, api_key=live.key) as outlast, live.client() as http:
        flaky = await outlast.submit("flaky", {"failures": 1}, max_attempts=2, metadata={"a": [1, None]})
        cancelled = await outlast.submit("sleep", {"seconds": 60})
        await outlast.cancel(cancelled.id)
        await drain()
        retried = await outlast.retry(cancelled.id)
        for job_id in (flaky.id, cancelled.id, retried.id):
            raw = (await http.get(f"/v1/jobs/{job_id}")).json()
            assert msgspec.to_builtins(await outlast.get(job_id)) == raw
        frames = await read_stream(http, str(flaky.id))
        events = [e async for e in outlast.stream(flaky.id)]
    assert [e.id for e in events] == [f.id for f in frames]
    for event, frame in zip(events, frames, strict=True):
        if isinstance(event, StatusEvent):
            expected = {**frame.data}
            assert msgspec.to_builtins(event.retry) == expected.pop("retry", None)
            assert msgspec.to_builtins(event.job) == expected
    retries = [e for e in events if isinstance(e, StatusEvent) and e.retry is not None]
    assert retries and retries[0].retry is not None and retries[0].retry.error is not None
    assert retries[0].retry.error.type == "retryable_error"


def test_the_clients_submit_takes_every_field_of_the_servers_submit_body() -> None:
    body = {f.name for f in msgspec.structs.fields(SubmitJob)} | {f.name for f in msgspec.structs.fields(BatchItem)}
    spec = {f.name for f in msgspec.structs.fields(JobSpec)}
    assert body - spec == set()
    for method in (Client.submit, AsyncClient.submit):
        assert spec - set(inspect.signature(method).parameters) == set()


# -- dropped connections ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_stream_cut_mid_job_resumes_with_last_event_id_and_sees_every_event_once(
    live: Live, proxy: tuple[Proxy, str], drain: Drain, kind: str
) -> None:
    cutter, url = proxy
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        job = await outlast.submit("sleep", SLEEP)
    worker: list[asyncio.Task[None]] = []
    cuts: list[int] = []

    def on_event(event: Event) -> None:
        if event.id == 1:  # queued, and no worker yet: the job goes on while the client is away
            cutter.cut()
            worker.append(asyncio.create_task(drain()))
        elif isinstance(event, ProgressEvent) and not cuts:  # and once more mid-run
            cuts.append(event.id)
            cutter.cut()

    events = await follow(kind, url, live.key, str(job.id), on_event)
    await worker[0]
    async with live.client() as http:
        frames = await read_stream(http, str(job.id))
    assert [(e.id, type(e).__name__) for e in events] == [
        (f.id, {"status": "StatusEvent", "progress": "ProgressEvent", "log": "LogEvent"}[f.event]) for f in frames
    ]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert cuts and cuts[0] < events[-1].id  # the second cut came mid-run
    last = events[-1]
    assert isinstance(last, StatusEvent) and last.job.status == "succeeded"
    assert last.job.result == {"slept_s": 1.0, "steps": 4}
    # Each reconnect asked for what came after the last event it had: the first right after event 1.
    resumed = cutter.last_event_ids()
    assert len(resumed) >= 2 and resumed[0] == 1 and resumed == sorted(resumed) and resumed[-1] >= cuts[0]


@pytest.mark.parametrize("call", ["submit", "submit_many", "retry"])
async def test_a_request_whose_answer_was_dropped_is_sent_again_and_makes_its_jobs_once(
    live: Live, proxy: tuple[Proxy, str], deps: Deps, call: str
) -> None:
    cutter, url = proxy
    async with AsyncClient(url, api_key=live.key) as outlast:
        ended = await outlast.submit("sleep", {"seconds": 60})
        await outlast.cancel(ended.id)
        before = await deps.db.fetch_val("SELECT count(*) FROM jobs")
        cutter.drop_next_answer = True
        if call == "submit":
            made = [await outlast.submit("square_sum", {"data": [2]})]
        elif call == "submit_many":
            made = await outlast.submit_many([JobSpec(type="square_sum", input={"data": [n]}) for n in range(3)])
        else:
            made = [await outlast.retry(ended.id)]
    assert not cutter.drop_next_answer  # an answer was dropped: the request was sent twice
    ids = [r["id"] for r in await deps.db.fetch_all("SELECT id FROM jobs ORDER BY id")]
    assert len(ids) == before + len(made) and {j.id for j in made} <= set(ids)


async def test_a_workflow_whose_answer_was_dropped_is_sent_again_and_made_once(
    live: Live, proxy: tuple[Proxy, str], deps: Deps
) -> None:
    cutter, url = proxy
    async with AsyncClient(url, api_key=live.key) as outlast:
        cutter.drop_next_answer = True
        made = await outlast.submit_workflow([StepSpec(name="one", type="square_sum", input={"data": [2]})])
    assert not cutter.drop_next_answer  # an answer was dropped: the request was sent twice
    assert [r["id"] for r in await deps.db.fetch_all("SELECT id FROM workflows")] == [made.id]


async def test_the_client_submits_waits_for_and_cancels_workflows_decoding_every_field(
    live: Live, drain: Drain
) -> None:
    from worker.workflows import StepState as ServerStepState
    from worker.workflows import Workflow as ServerWorkflow

    for ours, theirs in ((outlast_client.Workflow, ServerWorkflow), (outlast_client.StepState, ServerStepState)):
        assert {f.name for f in msgspec.structs.fields(ours)} == {f.name for f in msgspec.structs.fields(theirs)}
    steps = [
        StepSpec(name="sums", type="square_sum", input={"data": [1, 2]}, max_attempts=2, metadata={"part": 1}),
        StepSpec(name="then", type="cube_sum", input={"data": [2]}, after=["sums"], priority=3),
    ]

    def submit() -> tuple[outlast_client.Workflow, outlast_client.Workflow]:
        with Client(live.url, api_key=live.key) as outlast:
            return outlast.submit_workflow(steps, metadata={"run": "nightly"}), outlast.submit_workflow(steps)

    flow, other = await asyncio.to_thread(submit)
    assert (flow.status, flow.done, flow.metadata, list(flow.steps)) == (
        "running",
        False,
        {"run": "nightly"},
        steps_of(steps),
    )
    assert flow.steps["then"].status == "waiting" and len(flow.steps["sums"].job_ids) == 1
    async with AsyncClient(live.url, api_key=live.key) as outlast, live.client() as http:
        cancelled = await outlast.cancel_workflow(other.id)
        assert cancelled.status == "cancelled" and cancelled.error is not None
        with pytest.raises(Conflict):
            await outlast.cancel_workflow(other.id)
        await drain()
        done = await outlast.wait_workflow(flow.id, timeout=10, poll_s=0.05)
        raw = (await http.get(f"/v1/workflows/{flow.id}")).json()
    assert msgspec.to_builtins(done) == raw
    assert done.status == "succeeded" and done.steps["then"].counts == {"succeeded": 1}


def steps_of(steps: list[StepSpec]) -> list[str]:
    return [step.name for step in steps]


async def test_a_workflows_stream_is_followed_live_to_its_end_and_resumed_after_an_event(
    live: Live, drain: Drain
) -> None:
    steps = [
        StepSpec(name="sums", type="square_sum", input={"data": [1, 2]}),
        StepSpec(name="then", type="cube_sum", input={"data": [2]}, after=["sums"]),
    ]
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        flow = await outlast.submit_workflow(steps)
        seen: list[outlast_client.WorkflowStreamEvent] = []

        async def follow() -> None:
            async for event in outlast.stream_workflow(flow.id):
                seen.append(event)

        following = asyncio.create_task(follow())
        await drain()
        await asyncio.wait_for(following, 15)  # it ends by itself, after the workflow's last event
    assert isinstance(seen[-1], outlast_client.WorkflowEvent) and seen[-1].status == "succeeded" and seen[-1].done
    assert [e.id for e in seen] == list(range(1, len(seen) + 1))
    assert [(e.step, e.status) for e in seen if isinstance(e, outlast_client.StepEvent) and e.step == "then"] == [
        ("then", "waiting"),
        ("then", "ready"),
        ("then", "running"),
        ("then", "succeeded"),
    ]

    def resumed() -> list[outlast_client.WorkflowStreamEvent]:
        with Client(live.url, api_key=live.key) as sync:
            return list(sync.stream_workflow(flow.id, after=seen[2].id))

    assert await asyncio.to_thread(resumed) == seen[3:]


async def test_wait_outlasts_many_long_polls_until_the_job_ends(live: Live, drain: Drain) -> None:
    """No count of polls ends a wait: it holds on through long poll after long poll (here of 1 s) for as long as the
    job runs, and returns when it ends (here when it is cancelled, so the test decides when)."""
    polls: list[httpx.Request] = []

    class Counting(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                polls.append(request)
            return await super().handle_async_request(request)

    async with AsyncClient(live.url, api_key=live.key, long_poll=1, transport=Counting()) as outlast:
        job = await outlast.submit("sleep", {"seconds": 600})
        worker = asyncio.create_task(drain())
        waiting = asyncio.create_task(outlast.wait(job.id))
        await eventually(lambda: _true(len(polls) >= 4 and not waiting.done()))
        assert (await outlast.get(job.id)).status == "running"
        await outlast.cancel(job.id)
        done = await waiting
        await worker
    assert done.status == "cancelled" and done.error is not None and done.error.type == "cancelled"
    assert all(p.headers["prefer"] == "wait=1" for p in polls[:4])


async def _true(condition: bool) -> bool | None:
    return condition or None


async def test_the_client_asks_for_when_and_how_much_and_reads_them_back(live: Live) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        job = await outlast.submit("sleep", SLEEP, delay_s=3600, priority=-3)
        assert job.status == "queued" and job.priority == -3 and job.run_at is not None
        assert job.run_at > job.created_at
        keyed = await outlast.submit("keyed", {"seconds": 0}, concurrency_key="acme")
        assert (await outlast.get(keyed.id)).concurrency_key == "acme"


async def test_wait_with_a_timeout_raises_job_not_done_carrying_the_job(live: Live) -> None:
    async with AsyncClient(live.url, api_key=live.key, long_poll=1) as outlast:
        job = await outlast.submit("sleep", SLEEP)  # no worker: it stays queued
        with pytest.raises(JobNotDone) as raised:
            await outlast.wait(job.id, timeout=1.5)
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.job is not None and raised.value.job.status == "queued"


# -- results and errors ---------------------------------------------------------------------------------------------


async def test_result_of_a_failed_job_raises_job_failed_carrying_the_jobs_error(live: Live, drain: Drain) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        job = await outlast.submit("refuse")
        await drain()
        done = await outlast.wait(job.id)
        with pytest.raises(JobFailed) as raised:
            await outlast.result(job.id)
    assert done.status == "failed"
    assert raised.value.error == done.error and raised.value.error is not None
    assert (raised.value.error.type, raised.value.error.message) == ("bad_input", "the input can never work")
    assert raised.value.job_id == str(job.id) and isinstance(raised.value, Conflict)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_result_to_a_file_streams_it_there(live: Live, drain: Drain, tmp_path: Path, kind: str) -> None:
    text = msgspec.json.encode({"rows": ["x" * 100] * 3_000}).decode()  # about 300 KB
    path, buffer = tmp_path / "result.json", io.BytesIO()
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        job = await outlast.submit("raw_result", {"json": text})
        await drain()
        if kind == "async":
            written = [await outlast.result(job.id, to=path), await outlast.result(job.id, to=buffer)]
        else:

            def fetch() -> list[int]:
                with Client(live.url, api_key=live.key) as sync:
                    return [sync.result(job.id, to=str(path)), sync.result(job.id, to=buffer)]

            written = await asyncio.to_thread(fetch)
        decoded = await outlast.result(job.id)
    assert msgspec.json.decode(path.read_bytes()) == msgspec.json.decode(buffer.getvalue()) == decoded
    assert written == [path.stat().st_size, len(buffer.getvalue())] and written[0] > 300_000
    assert os.listdir(tmp_path) == ["result.json"]  # no .part left behind


async def test_a_result_that_fails_leaves_no_file(live: Live, drain: Drain, tmp_path: Path) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        job = await outlast.submit("sleep", SLEEP)
        with pytest.raises(JobNotDone):
            await outlast.result(job.id, to=tmp_path / "result.json")
    assert os.listdir(tmp_path) == []


async def test_errors_are_typed_by_the_problem_the_server_answered(live: Live, drain: Drain) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        with pytest.raises(NotFound):
            await outlast.get("0193b7c2-5f1e-7c3a-9d2e-8f0a1b2c3d4e")
        with pytest.raises(InvalidInput) as invalid:
            await outlast.submit("square_sum", {"data": ["three"]})
        assert [e.loc for e in invalid.value.errors] == ["$.input.data[0]"] and invalid.value.status == 422
        with pytest.raises(UnknownJobType):
            await outlast.submit("nope", {})
        done = await outlast.submit("square_sum", {"data": [1]}, idempotency_key="k")
        with pytest.raises(IdempotencyKeyReused):
            await outlast.submit("square_sum", {"data": [2]}, idempotency_key="k")
        await drain()
        with pytest.raises(Conflict) as conflict:
            await outlast.cancel(done.id)
        assert conflict.value.slug == "conflict" and "succeeded" in str(conflict.value)
        with pytest.raises(Conflict):
            await outlast.retry(done.id)
    async with AsyncClient(live.url, api_key="olk_not_a_key") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.get(done.id)


async def test_429_is_tried_again_after_retry_after_and_a_spent_budget_raises_rate_limited(
    config: Config, deps: Deps
) -> None:
    strict = msgspec.structs.replace(config, submit_rate_per_s=1.0, submit_burst=1)
    async with live_server(strict) as server:
        async with AsyncClient(server.url, api_key=server.key) as patient:
            jobs = [await patient.submit("square_sum", {"data": [n]}) for n in range(2)]  # the second waits a token
        async with AsyncClient(server.url, api_key=server.key, retry_for=0) as hasty:
            with pytest.raises(RateLimited) as raised:
                await hasty.submit("square_sum", {"data": [3]})
    assert len({j.id for j in jobs}) == 2
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1
    assert await deps.db.fetch_val("SELECT count(*) FROM jobs") == 2


# -- list, tokens, settings -------------------------------------------------------------------------------------------


async def test_list_iterates_every_page_newest_first(live: Live) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        made = [await outlast.submit("square_sum", {"data": [n]}) for n in range(5)]
        await outlast.cancel(made[1].id)
        listed = [j.id async for j in outlast.list(page_size=2)]
        cancelled = [j.id async for j in outlast.list(status="cancelled", type="square_sum")]

    def sync_list() -> list[Any]:
        with Client(live.url, api_key=live.key) as sync:
            return [j.id for j in sync.list(page_size=3)]

    assert listed == [j.id for j in reversed(made)] == await asyncio.to_thread(sync_list)
    assert cancelled == [made[1].id]


async def test_a_job_read_token_reads_its_job_and_does_nothing_else(live: Live, drain: Drain) -> None:
    async with AsyncClient(live.url, api_key=live.key) as outlast:
        job = await outlast.submit("square_sum", {"data": [2, 2]})
    token = parse_qs(urlsplit(job.links.self).query)["token"][0]
    await drain()
    async with AsyncClient(live.url, token=token) as reader:
        assert (await reader.wait(job.id)).status == "succeeded"
        assert await reader.result(job.id) == 8
        assert [e.id async for e in reader.stream(job.id)][-1] >= 3
        with pytest.raises(Unauthorized):
            await reader.cancel(job.id)
        with pytest.raises(Unauthorized):
            await reader.submit("square_sum", {"data": [1]})


def test_url_and_key_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTLAST_URL", "http://outlast.example:9000/")
    monkeypatch.setenv("OUTLAST_API_KEY", "olk_from_env")
    with Client() as outlast:
        assert outlast.options.url == "http://outlast.example:9000"
        assert outlast.options.headers()["Authorization"] == "Bearer olk_from_env"
    with Client(token="olt_x") as reader:  # a token client never sends the environment's key beside it
        assert "Authorization" not in reader.options.headers() and reader.options.params() == {"token": "olt_x"}
    monkeypatch.delenv("OUTLAST_URL")
    with Client() as default:
        assert default.options.url == "http://127.0.0.1:8000"
    with pytest.raises(ValueError):
        Client(api_key="a", token="b")


# -- real processes ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_stream_across_a_killed_and_restarted_web_process_sees_every_event_once(
    processes: Processes,
) -> None:
    key = processes.headers["Authorization"].removeprefix("Bearer ")
    async with AsyncClient(processes.url, api_key=key) as outlast:
        job = await outlast.submit("sleep", {"seconds": 3.0, "steps": 6})
    restarted: list[bool] = []

    def on_event(event: Event) -> None:
        if isinstance(event, ProgressEvent) and not restarted:
            assert processes.web is not None
            processes.web.send_signal(signal.SIGKILL)
            processes.web.wait()
            processes.start_web()  # on the same port: the client reconnects to it
            restarted.append(True)

    events = await follow("sync", processes.url, key, str(job.id), on_event)
    assert restarted
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    last = events[-1]
    assert isinstance(last, StatusEvent) and last.job.status == "succeeded"

    def finish() -> Any:
        with Client(processes.url, api_key=key) as sync:
            return sync.wait(job.id).status, sync.result(job.id)

    assert await asyncio.to_thread(finish) == ("succeeded", {"slept_s": 3.0, "steps": 6})


@pytest.mark.slow
async def test_the_examples_of_docs_client_md_and_the_readme_work_as_printed(processes: Processes) -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    sync_example, async_example = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
    printed = re.search(r"It prints .*?```\n(.*?)```", text, re.S)
    assert printed is not None
    expected = printed.group(1).splitlines()
    env = {**os.environ, "OUTLAST_URL": processes.url}
    env["OUTLAST_API_KEY"] = processes.headers["Authorization"].removeprefix("Bearer ")
    readme = (ROOT / "README.md").read_text().split("### From Python", 1)[1]
    readme_example = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    outputs = []
    for code in (sync_example, async_example, readme_example):
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await run.communicate()
        assert run.returncode == 0, err.decode()
        outputs.append(out.decode().splitlines())
    lines, (line,), (readme_line,) = outputs
    assert lines[-1] == expected[-1] and set(lines) <= set(expected)  # progress is coalesced: some may not show
    assert line == readme_line == "succeeded 14"
