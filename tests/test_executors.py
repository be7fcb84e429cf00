"""Plain functions as job types: a blocking `def` in a thread, a CPU-bound one in a process of its own; progress and
log lines from either, heartbeats that never starve, and cancel and timeouts that still stop them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Any
from uuid import uuid4

import httpx
import msgspec
import pytest

from tests.conftest import Processes, eventually, wait_done
from tests.jobs import Nothing, Seconds, cpu_loop, plain_refuse, plain_unencodable
from worker import Context, JobError, JobType, Progress, Stopped, SyncContext
from worker.executors import Executors


def _context(progress: list[Progress], lines: list[tuple[str, str]]) -> Context:
    return Context(uuid4(), 1, 1, progress.append, lambda level, message: lines.append((level, message)))


async def test_a_coroutine_may_not_ask_for_a_process() -> None:
    async def run(input: Nothing, ctx: Context) -> None:
        return None

    with pytest.raises(ValueError, match="executor='process' runs a plain def"):
        JobType("bad", Nothing, run, executor="process")


async def test_a_process_jobs_progress_and_log_reach_the_loop_in_order_and_its_result_comes_back() -> None:
    progress: list[Progress] = []
    lines: list[tuple[str, str]] = []
    job_type = JobType("cpu_loop", Seconds, cpu_loop, executor="process")
    executors = Executors(2)
    try:
        result = await executors.call(job_type, Seconds(1.2), _context(progress, lines))
    finally:
        executors.shutdown()
    decoded = msgspec.json.decode(result)
    assert decoded["pid"] != os.getpid() and decoded["loops"] > 0
    assert lines == [("info", f"pid {decoded['pid']}")]
    assert progress and [p.fraction for p in progress] == sorted(p.fraction for p in progress)


async def test_a_process_jobs_error_keeps_its_type_and_an_unencodable_result_is_invalid_result() -> None:
    executors = Executors(2)
    try:
        with pytest.raises(JobError) as refused:
            await executors.call(
                JobType("plain_refuse", Nothing, plain_refuse, executor="process"), Nothing(), _context([], [])
            )
        assert (refused.value.type, refused.value.retryable) == ("bad_input", False)
        with pytest.raises(JobError) as unencodable:
            await executors.call(
                JobType("plain_unencodable", Nothing, plain_unencodable, executor="process"),
                Nothing(),
                _context([], []),
            )
        assert (unencodable.value.type, unencodable.value.retryable) == ("invalid_result", False)
    finally:
        executors.shutdown()


async def test_a_thread_whose_attempt_was_cancelled_is_stopped_at_its_next_progress() -> None:
    stopped, reported = threading.Event(), threading.Event()

    def forever(input: Nothing, ctx: SyncContext) -> None:
        try:
            while True:
                time.sleep(0.01)
                ctx.progress(0.5)
                reported.set()
        except Stopped:
            stopped.set()
            raise

    executors = Executors(2)
    try:
        task = asyncio.ensure_future(executors.call(JobType("forever", Nothing, forever), Nothing(), _context([], [])))
        await eventually(lambda: _true(reported.is_set()))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await eventually(lambda: _true(stopped.is_set()))
    finally:
        executors.shutdown()


async def _true(value: bool) -> bool | None:
    return value or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ", 1)[1].startswith("Z")


async def _events(http: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        text = (await response.aread()).decode()
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append({"event": fields["event"], "data": msgspec.json.decode(fields.get("data", "null"))})
    return events


@pytest.mark.slow
async def test_a_blocking_plain_function_runs_past_its_lease_in_a_thread_and_is_never_rescued(
    processes: Processes,
) -> None:
    async with processes.client() as http:
        job = (await http.post("/v1/jobs", json={"type": "blocking_sleep", "input": {"seconds": 5}})).json()
        done = await wait_done(http, job["id"])
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 1  # 5 s of blocking under a 3 s lease: heartbeats went on, no rescue
        assert done["result"]["thread"].startswith("outlast-job")
        messages = [e["data"]["message"] for e in await _events(http, job["id"]) if e["event"] == "progress"]
        assert "step 1" in messages and messages.index("step 1") < messages.index("step 9")


@pytest.mark.slow
async def test_a_cpu_bound_plain_function_runs_past_its_lease_in_a_process_and_is_never_rescued(
    processes: Processes,
) -> None:
    async with processes.client() as http:
        job = (await http.post("/v1/jobs", json={"type": "cpu_loop", "input": {"seconds": 5}})).json()
        done = await wait_done(http, job["id"])
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 1
        assert processes.worker is not None and done["result"]["pid"] != processes.worker.pid


async def _pid_of(http: httpx.AsyncClient, job_id: str) -> int:
    """The job's process, from the log line it writes first (its stream stays open while it runs: read up to it)."""

    async def logged() -> int:
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"pid ' in line:
                    message: str = msgspec.json.decode(line.removeprefix("data: "))["message"]
                    return int(message.split()[1])
        raise AssertionError(f"job {job_id}'s stream ended with no pid line")

    return await asyncio.wait_for(logged(), 30)


@pytest.mark.slow
async def test_cancel_terminates_a_process_job_and_a_timeout_does_too(processes: Processes) -> None:
    async with processes.client() as http:
        cancelled = (await http.post("/v1/jobs", json={"type": "cpu_loop", "input": {"seconds": 600}})).json()
        timed_out = (
            await http.post(
                "/v1/jobs", json={"type": "cpu_loop", "input": {"seconds": 600}, "timeout_s": 8, "max_attempts": 1}
            )
        ).json()
        # Both read at once, and a timeout that outlasts a process's start on a crowded machine: with 3 s, read after
        # the other, the second job timed out before its code wrote the pid line.
        pids = await asyncio.gather(_pid_of(http, cancelled["id"]), _pid_of(http, timed_out["id"]))
        assert (await http.post(f"/v1/jobs/{cancelled['id']}/cancel")).status_code == 202
        assert (await wait_done(http, cancelled["id"]))["status"] == "cancelled"
        failed = await wait_done(http, timed_out["id"])
        assert (failed["status"], failed["error"]["type"]) == ("failed", "timeout")
        for pid in pids:
            await eventually(lambda pid=pid: _true(not _alive(pid)))
