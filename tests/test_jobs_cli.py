"""`outlast jobs ...` and `outlast types` (worker/tools/jobs_cli.py), run as an operator runs them: the real command,
a process of its own, on the test's stores; jobs run by an in-process worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import ROOT, bearer, job_row, process_env
from tests.test_cancel import running
from worker import Config, Deps, keys

Drain = Callable[[], Awaitable[None]]
OUTLAST = str(Path(sys.executable).parent / "outlast")
SQUARES = {"type": "square_sum", "input": {"data": [1, 2, 3]}}
pytestmark = pytest.mark.slow  # each test starts the command's processes


def outlast(config: Config, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, on the test's stores (and its job modules: tests.jobs)."""
    argv = [OUTLAST, *args]
    return subprocess.run(argv, env=process_env(config), cwd=cwd, capture_output=True, text=True, timeout=60)


async def run(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(outlast, config, *args)


async def start(config: Config, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        OUTLAST, *args, env=process_env(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def submit(client: httpx.AsyncClient, body: dict[str, Any] = SQUARES, **headers: str) -> str:
    response = await client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def lines(text: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in text.splitlines()]


def without_links(job: dict[str, Any]) -> dict[str, Any]:
    """The API signs its links with a read token; the operator's view has none to sign."""
    return {k: v for k, v in job.items() if k not in ("links", "tenant")}


async def test_list_shows_every_tenants_jobs_newest_first_and_filters_by_tenant_status_and_type(
    config: Config, deps: Deps, client: httpx.AsyncClient, drain: Drain
) -> None:
    acme = bearer(await keys.create(deps.db, "acme"))
    done = await submit(client)
    await drain()
    queued = await submit(client, {"type": "sleep", "input": {"seconds": 1}})
    theirs = await submit(client, **acme)

    every = await run(config, "jobs", "list", "--json")
    assert every.returncode == 0, every.stderr
    found = lines(every.stdout)
    assert [(j["id"], j["tenant"]) for j in found] == [(theirs, "acme"), (queued, "default"), (done, "default")]
    assert [j["id"] for j in lines((await run(config, "jobs", "list", "--json", "--tenant", "acme")).stdout)] == [
        theirs
    ]
    assert [j["id"] for j in lines((await run(config, "jobs", "list", "--json", "--status", "succeeded")).stdout)] == [
        done
    ]
    assert [j["id"] for j in lines((await run(config, "jobs", "list", "--json", "--type", "sleep")).stdout)] == [queued]
    assert [j["id"] for j in lines((await run(config, "jobs", "list", "--json", "--limit", "1")).stdout)] == [theirs]

    table = await run(config, "jobs", "list")
    assert table.returncode == 0, table.stderr
    header, _, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["id", "tenant", "type", "status"]
    assert [row.split()[:4] for row in rows] == [
        [theirs, "acme", "square_sum", "queued"],
        [queued, "default", "sleep", "queued"],
        [done, "default", "square_sum", "succeeded"],
    ]
    nothing = await run(config, "jobs", "list", "--tenant", "nobody")
    assert nothing.returncode == 0 and nothing.stdout == "" and "no jobs" in nothing.stderr


async def test_get_json_is_the_job_as_the_api_shows_it_with_its_tenant(
    config: Config, client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, {**SQUARES, "metadata": {"order": 42}})
    await drain()
    got = await run(config, "jobs", "get", job_id, "--json")
    assert got.returncode == 0, got.stderr
    job = msgspec.json.decode(got.stdout)
    api = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert without_links(job) == without_links(api) and job["tenant"] == "default"
    assert job["links"]["self"] == f"/v1/jobs/{job_id}"

    shown = await run(config, "jobs", "get", job_id)
    assert shown.returncode == 0, shown.stderr
    fields = {line.split()[0]: line.split(maxsplit=1)[1].strip() for line in shown.stdout.splitlines() if line.strip()}
    assert fields["id"] == job_id and fields["status"] == "succeeded" and fields["result"] == "14"
    assert fields["metadata"] == '{"order":42}' and fields["tenant"] == "default"
    assert (await run(config, "jobs", "get", job_id, "--tenant", "acme")).returncode == 3  # scoped: not theirs


async def wait_started(process: asyncio.subprocess.Process, job_id: str) -> None:
    """Until the command shows the job: it has read it, not yet ended, and is following it."""
    assert process.stderr is not None
    first = await asyncio.wait_for(process.stderr.readline(), 30)
    assert first.decode().startswith(job_id), first
    assert process.returncode is None


async def test_wait_shows_a_live_jobs_progress_until_it_succeeds_and_exits_0(
    config: Config, client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, {"type": "sleep", "input": {"seconds": 0.4, "steps": 4}})
    waiting = await start(config, "jobs", "wait", job_id)
    await wait_started(waiting, job_id)
    await drain()
    out, err = await waiting.communicate()
    assert waiting.returncode == 0, err
    assert out.decode().startswith(f"{job_id} sleep succeeded after")
    assert "info    sleeping 0.4 s in 4 steps" in err.decode()  # the job's log line, above the bar
    assert "100.0% succeeded step 4 of 4" in err.decode()  # the bar, drawn once at the end off a terminal
    as_json = await run(config, "jobs", "wait", job_id, "--json")
    assert as_json.returncode == 0 and as_json.stderr == ""
    job = msgspec.json.decode(as_json.stdout)
    assert job["status"] == "succeeded" and job["result"] == {"slept_s": 0.4, "steps": 4}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [({"type": "refuse", "max_attempts": 1}, "failed", 10), (SQUARES, "succeeded", 0)],
)
async def test_wait_exits_by_how_the_job_ended(
    config: Config, client: httpx.AsyncClient, drain: Drain, body: dict[str, Any], status: str, code: int
) -> None:
    job_id = await submit(client, body)
    waiting = await start(config, "jobs", "wait", job_id)
    await wait_started(waiting, job_id)
    await drain()
    out, err = await waiting.communicate()
    assert waiting.returncode == code, err
    assert out.decode().startswith(f"{job_id} {body['type']} {status} after")
    again = await run(config, "jobs", "wait", job_id)  # already ended: at once, the same answer
    assert again.returncode == code
    if status == "failed":
        assert "bad_input: the input can never work" in again.stdout


async def test_cancel_ends_a_queued_job_and_refuses_one_that_has_ended(
    config: Config, deps: Deps, client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client)
    cancelled = await run(config, "jobs", "cancel", job_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert msgspec.json.decode(cancelled.stdout)["status"] == "cancelled"
    await drain()
    assert (await job_row(deps, job_id))["status"] == "cancelled"
    assert (await run(config, "jobs", "wait", job_id)).returncode == 11
    again = await run(config, "jobs", "cancel", job_id)
    assert again.returncode == 4 and again.stderr.strip() == f"{job_id} is already cancelled: nothing to cancel"


async def test_cancel_interrupts_a_running_job(
    config: Config, deps: Deps, client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, {"type": "sleep", "input": {"seconds": 600, "steps": 1}})
    worker = asyncio.create_task(drain())
    await running(deps, job_id)
    asked = await run(config, "jobs", "cancel", job_id)
    assert asked.returncode == 0 and "asked" in asked.stderr
    await asyncio.wait_for(worker, 30)  # the 600 s job stopped: arq's abort reached its task
    assert (await job_row(deps, job_id))["status"] == "cancelled"


async def test_retry_makes_a_new_job_from_a_failed_one_and_dispatches_it(
    config: Config, deps: Deps, client: httpx.AsyncClient, drain: Drain
) -> None:
    failed = await submit(client, {"type": "refuse", "max_attempts": 1, "metadata": {"k": "v"}})
    await drain()
    retried = await run(config, "jobs", "retry", failed)
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.strip()  # alone on stdout: NEW=$(outlast jobs retry ID)
    job = (await client.get(f"/v1/jobs/{new_id}")).json()
    assert job["retry_of"] == failed and job["type"] == "refuse" and job["metadata"] == {"k": "v"}
    await drain()  # it was rung: the worker runs it
    assert (await job_row(deps, new_id))["status"] == "failed"
    live = await submit(client)
    refused = await run(config, "jobs", "retry", live)
    assert refused.returncode == 4 and "only a failed, cancelled or expired job can be retried" in refused.stderr


async def test_result_prints_the_json_or_writes_it_to_a_file_and_says_why_there_is_none(
    config: Config, client: httpx.AsyncClient, drain: Drain, tmp_path: Path
) -> None:
    done = await submit(client)
    failed = await submit(client, {"type": "refuse", "max_attempts": 1})
    await drain()
    printed = await run(config, "jobs", "result", done)
    assert printed.returncode == 0 and printed.stdout == "14\n"
    path = tmp_path / "result.json"
    written = await run(config, "jobs", "result", done, "-o", str(path))
    assert written.returncode == 0 and written.stdout == "" and path.read_text() == "14"
    big = await submit(client, {"type": "raw_result", "input": {"json": '{"rows": [1, 2, 3], "name": "x"}'}})
    await drain()
    await run(config, "jobs", "result", big, "-o", str(path))
    assert msgspec.json.decode(path.read_bytes()) == (await client.get(f"/v1/jobs/{big}/result")).json()

    not_yet = await run(config, "jobs", "result", await submit(client))
    assert not_yet.returncode == 4 and "no result yet" in not_yet.stderr
    why = await run(config, "jobs", "result", failed)
    assert why.returncode == 10 and why.stderr.strip() == f"{failed} failed: bad_input: the input can never work"


@pytest.mark.parametrize("command", ["get", "wait", "watch", "result", "cancel", "retry"])
async def test_a_missing_job_is_one_line_and_exit_3_not_a_traceback(config: Config, deps: Deps, command: str) -> None:
    for job_id in (str(uuid.uuid4()), "not-a-job-id"):
        answer = await run(config, "jobs", command, job_id)
        assert answer.returncode == 3, answer.stderr
        assert answer.stderr.startswith(f"no job {job_id!r}" if job_id[0] == "n" else f"no job {job_id}")
        assert answer.stderr.count("\n") == 1 and answer.stdout == ""


async def test_types_json_is_what_get_job_types_answers(config: Config, client: httpx.AsyncClient) -> None:
    listed = await run(config, "types", "--json")
    assert listed.returncode == 0, listed.stderr
    assert msgspec.json.decode(listed.stdout) == (await client.get("/v1/job-types")).json()
    table = await run(config, "types")
    names = [line.split()[0] for line in table.stdout.splitlines()[2:]]
    assert names[:4] == ["square_sum", "cube_sum", "sleep", "flaky"] and "refuse" in names


async def test_watch_json_prints_a_jobs_events_as_its_stream_carries_them(
    config: Config, client: httpx.AsyncClient, drain: Drain
) -> None:
    job_id = await submit(client, {"type": "sleep", "input": {"seconds": 0.2, "steps": 2}})
    await drain()
    watched = await run(config, "jobs", "watch", job_id, "--json")
    assert watched.returncode == 0, watched.stderr
    frames = lines(watched.stdout)
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        stream = [line async for line in response.aiter_lines() if line.startswith(("id:", "event:"))]
    assert [f"id: {f['id']}" for f in frames] == stream[0::2]
    assert [f"event: {f['event']}" for f in frames] == stream[1::2]
    assert frames[-1]["event"] == "status" and frames[-1]["data"]["status"] == "succeeded"
    assert without_links(frames[-1]["data"]) == without_links((await client.get(f"/v1/jobs/{job_id}")).json())


async def test_watch_without_an_id_follows_every_live_job_until_none_is_left(
    config: Config, client: httpx.AsyncClient, drain: Drain
) -> None:
    idle = await run(config, "jobs", "watch", "--json")
    assert idle.returncode == 0 and idle.stdout == "" and "no job is queued or running" in idle.stderr
    first, second = await submit(client), await submit(client, {"type": "refuse", "max_attempts": 1})
    watching = await start(config, "jobs", "watch", "--json")
    assert watching.stdout is not None
    now = [msgspec.json.decode(await asyncio.wait_for(watching.stdout.readline(), 30)) for _ in range(2)]
    assert {(job["id"], job["status"]) for job in now} == {(first, "queued"), (second, "queued")}
    await drain()
    out, err = await watching.communicate()
    assert watching.returncode == 0, err
    ended = {job["id"]: job["status"] for job in lines(out.decode())}
    assert ended == {first: "succeeded", second: "failed"}


def test_without_stores_each_command_says_what_to_set_in_one_line(tmp_path: Path) -> None:
    env = process_env(Config())  # nothing set: the defaults' URLs are never tried
    for args, missing in ((["jobs", "list"], "DATABASE_URL is not set"), (["jobs", "wait", "x"], "DATABASE_URL and")):
        answer = subprocess.run([OUTLAST, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert answer.returncode == 1 and answer.stderr.count("\n") == 1 and missing in answer.stderr, answer.stderr
