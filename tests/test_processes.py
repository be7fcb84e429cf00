"""Behaviour that crosses processes: real uvicorn and arq processes, as the Procfile runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.conftest import ROOT, Processes, bearer, eventually, free_port, process_env, wait_done, wait_ready
from worker import Config, Deps, connect, keys
from worker.migrate import create_database, migrate

pytestmark = pytest.mark.slow


async def test_submitted_job_succeeds_through_real_web_and_worker_processes(processes: Processes) -> None:
    async with processes.client() as client:
        response = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [1, 2, 3, 4]}})
        assert response.status_code == 202
        job = await wait_done(client, response.headers["location"].rpartition("/")[2])
        assert job["status"] == "succeeded" and job["result"] == 30
        assert (await client.get(f"/v1/jobs/{job['id']}/result")).json() == 30


async def test_the_worker_process_runs_jobs_on_uvloop(processes: Processes) -> None:
    async with processes.client() as client:
        response = await client.post("/v1/jobs", json={"type": "event_loop", "input": {}})
        job = await wait_done(client, response.json()["id"])
    assert job["status"] == "succeeded" and job["result"].startswith("uvloop"), job


async def test_jobs_queued_before_redis_lost_everything_all_finish(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    procs = Processes(process_env(config), tmp_path, api_key)
    procs.start_web()
    try:
        await procs.ready()
        async with procs.client() as client:
            ids = [
                (await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [i]}})).json()["id"]
                for i in range(20)
            ]
            assert await deps.redis.zcard("outlast:queue") == 20
            # Our own private server when embedded; a shared one only loses this test's index.
            await (deps.redis.flushall() if "TEST_REDIS_URL" not in os.environ else deps.redis.flushdb())
            procs.start_worker()
            jobs = [await wait_done(client, job_id) for job_id in ids]
        assert [j["result"] for j in jobs] == [i * i for i in range(20)]
        assert all(j["attempt"] == 1 for j in jobs)
    finally:
        procs.stop()


def _arq_check(env: dict[str, str], name: str = "worker") -> int:
    """`arq --check` as run beside the worker named `name` (its health key is per instance)."""
    env = env | {"OUTLAST_WORKER_NAME": name}
    argv = [sys.executable, "-m", "arq", "--check", "worker.settings.WorkerSettings"]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=30, check=False).returncode


async def test_arq_check_is_green_while_the_worker_lives_and_red_soon_after_kill_9(processes: Processes) -> None:
    async def green() -> bool | None:
        return await asyncio.to_thread(_arq_check, processes.env) == 0 or None

    await eventually(green, within=15)
    assert processes.worker is not None
    processes.worker.send_signal(signal.SIGKILL)
    processes.worker.wait()

    async def red() -> bool | None:
        return await asyncio.to_thread(_arq_check, processes.env) != 0 or None

    # health_check_interval is 1 s here: the key's TTL is interval + 1 s.
    await eventually(red, within=1 + 1 + 5)


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[object]:
    from worker.tools.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / "pg", port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.remove_data()


async def test_postgres_down_answers_503_with_retry_after_and_both_processes_recover(
    config: Config, private_postgres: object, tmp_path: Path
) -> None:
    from worker.tools.embedded import EmbeddedPostgres

    assert isinstance(private_postgres, EmbeddedPostgres)
    dsn = private_postgres.dsn("outlast")
    await create_database(dsn)
    await migrate(dsn)
    own = msgspec.structs.replace(config, database_url=dsn, redis_url=config.redis_url.rpartition("/")[0] + "/15")
    async with connect(own) as deps:
        await deps.redis.flushdb()
        key = await keys.create(deps.db, "default")
    procs = Processes(process_env(own), tmp_path, key)
    procs.start_web()
    procs.start_worker()
    try:
        await procs.ready()
        async with procs.client(timeout=30) as client:
            first = (await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [2]}})).json()
            assert (await wait_done(client, first["id"]))["result"] == 4

            private_postgres.stop("fast")
            answers = [
                await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [3]}}),
                await client.get(f"/v1/jobs/{first['id']}"),
                await client.get("/v1/jobs"),
                await client.get(f"/v1/jobs/{first['id']}/result"),
            ]
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["type"] == "/problems/unavailable" and int(answer.headers["retry-after"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"] == "down" and ready.json()["redis"] == "ok"

            private_postgres.start()  # same port: the processes reconnect on their own

            async def accepted() -> httpx.Response | None:
                answer = await client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [5]}})
                return answer if answer.status_code == 202 else None

            job = await wait_done(client, (await eventually(accepted, within=30)).json()["id"])
            assert job["status"] == "succeeded" and job["result"] == 25
        assert procs.web is not None and procs.web.poll() is None  # neither process was restarted
        assert procs.worker is not None and procs.worker.poll() is None
        assert "Exception in ASGI application" not in procs.log("web")  # no request escaped the handlers
    finally:
        procs.stop()


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def spawn_shell(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(["sh", "-c", f"exec {command}"], cwd=ROOT, env=env, stdout=out, stderr=out)


async def test_procfile_runs_with_only_database_url_redis_url_port_and_the_secret_key(
    config: Config, deps: Deps, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DATABASE_URL": config.database_url,
        "REDIS_URL": config.redis_url,
        "PORT": str(port),
        "OUTLAST_SECRET_KEY": config.secret_key,
    }
    commands = procfile()
    assert set(commands) == {"release", "web", "worker"}
    release = await asyncio.to_thread(
        subprocess.run, ["sh", "-c", commands["release"]], cwd=ROOT, env=env, capture_output=True, check=False
    )
    assert release.returncode == 0, release.stderr
    created = await asyncio.to_thread(
        subprocess.run, ["outlast", "keys", "create", "default"], env=env, capture_output=True, check=True
    )
    key = created.stdout.decode().splitlines()[-1]  # the key alone on the last line, as scripts capture it
    web = spawn_shell(commands["web"], env, tmp_path / "web.log")
    worker = spawn_shell(commands["worker"], env, tmp_path / "worker.log")
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=bearer(key)) as client:
            submitted = await client.post("/v1/jobs", json={"type": "cube_sum", "input": {"data": [1, 2]}})
            assert (await wait_done(client, submitted.json()["id"]))["result"] == 9
    finally:
        for proc in (web, worker):
            proc.terminate()
        for proc in (web, worker):
            await asyncio.to_thread(proc.wait, 30)


async def test_outlast_submit_wait_shows_progress_and_prints_the_finished_job(processes: Processes) -> None:
    outlast = str(Path(sys.executable).parent / "outlast")
    argv = [outlast, "submit", "sleep", '{"seconds": 1, "steps": 4}', "--wait", "--url", processes.url]
    env = {**os.environ, "OUTLAST_API_KEY": processes.headers["Authorization"].removeprefix("Bearer ")}
    done = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    job = msgspec.json.decode(done.stdout)
    assert job["status"] == "succeeded" and job["result"] == {"slept_s": 1.0, "steps": 4}
    assert b"100.0%" in done.stderr and b"step 4 of 4" in done.stderr
    assert b"info    sleeping 1 s in 4 steps" in done.stderr  # the job's own log line, from the event stream


async def test_outlast_submit_passes_when_and_how_much_to_the_server(processes: Processes) -> None:
    outlast = str(Path(sys.executable).parent / "outlast")
    flags = ["--delay", "3600", "--priority", "7", "--url", processes.url]
    argv = [outlast, "submit", "sleep", '{"seconds": 1}', *flags]
    env = {**os.environ, "OUTLAST_API_KEY": processes.headers["Authorization"].removeprefix("Bearer ")}
    done = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    job = msgspec.json.decode(done.stdout)
    assert job["status"] == "queued" and job["priority"] == 7 and job["run_at"] is not None
    refused = [outlast, "submit", "sleep", "{}", "--concurrency-key", "acme", "--url", processes.url]
    done = await asyncio.to_thread(subprocess.run, refused, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode != 0 and b"concurrency_key" in done.stderr  # the server's 422, named, not a traceback
    assert b"Traceback" not in done.stderr


async def test_outlast_workflows_submit_wait_watches_it_to_the_end_and_cancel_ends_another(
    processes: Processes, tmp_path: Path
) -> None:
    outlast = str(Path(sys.executable).parent / "outlast")
    env = {**os.environ, "OUTLAST_API_KEY": processes.headers["Authorization"].removeprefix("Bearer ")}
    spec = tmp_path / "workflow.json"
    spec.write_text(
        '{"steps": [{"name": "sums", "type": "square_sum", "input": {"data": [1, 2]}},'
        ' {"name": "nap", "type": "sleep", "input": {"seconds": 0.5}, "after": ["sums"]}]}'
    )
    argv = [outlast, "workflows", "submit", str(spec), "--wait", "--url", processes.url]
    done = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    workflow = msgspec.json.decode(done.stdout)
    assert workflow["status"] == "succeeded" and list(workflow["steps"]) == ["sums", "nap"]
    assert b"succeeded" in done.stderr and b"1 succeeded" in done.stderr  # the steps' table, printed at the end

    long = [outlast, "workflows", "submit", "-", "--url", processes.url]
    body = b'{"steps": [{"name": "nap", "type": "sleep", "input": {"seconds": 60}}]}'
    made = await asyncio.to_thread(subprocess.run, long, input=body, env=env, capture_output=True, timeout=60)
    workflow_id = msgspec.json.decode(made.stdout)["id"]
    cancel = [outlast, "workflows", "cancel", workflow_id, "--url", processes.url]
    done = await asyncio.to_thread(subprocess.run, cancel, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and msgspec.json.decode(done.stdout)["status"] == "cancelled", done.stderr
    watch = [outlast, "workflows", "watch", workflow_id, "--url", processes.url]
    done = await asyncio.to_thread(subprocess.run, watch, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 1 and b"cancelled" in done.stderr  # ended, but not succeeded
    bad = [outlast, "workflows", "submit", "-", "--url", processes.url]
    cycle = b'{"steps": [{"name": "a", "type": "sleep", "after": ["a"]}]}'
    done = await asyncio.to_thread(subprocess.run, bad, input=cycle, env=env, capture_output=True, timeout=60)
    assert done.returncode != 0 and b"$.steps[0].after[0]" in done.stderr and b"Traceback" not in done.stderr


async def test_web_shutdown_with_open_streams_tells_each_to_reconnect_and_exits(
    config: Config, deps: Deps, tmp_path: Path, api_key: str
) -> None:
    from tests.sse import RawStream

    # 50 streams on one key: above the default per-key limit, which has its own test.
    procs = Processes(process_env(config, OUTLAST_MAX_STREAMS_PER_KEY="100"), tmp_path, api_key)
    procs.start_web()
    try:
        await procs.ready()
        async with httpx.AsyncClient(base_url=procs.url, headers=procs.headers) as client:
            ids = [(await client.post("/v1/jobs", json={"type": "sleep", "input": {}})).json()["id"] for _ in range(5)]
        streams = [await RawStream.open(procs.url, ids[i % 5], key=api_key) for i in range(50)]
        for stream in streams:
            assert (await stream.next_frame()) is not None
        assert procs.web is not None
        procs.web.send_signal(signal.SIGTERM)
        for stream in streams:
            assert [(f.event, f.data) for f in await stream.rest()] == [("reconnect", {"reason": "shutdown"})]

        async def exited() -> int | None:
            assert procs.web is not None
            return procs.web.poll()

        assert await eventually(exited) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        log = procs.log("web")
        assert "Exception in ASGI application" not in log and "without completing response" not in log
    finally:
        procs.stop()


async def test_a_job_blocking_the_event_loop_turns_arq_check_red_and_is_rescued_elsewhere(
    processes: Processes, deps: Deps
) -> None:
    async with processes.client() as client:
        submitted = await client.post("/v1/jobs", json={"type": "block_first", "input": {"seconds": 12}})
        job_id = submitted.json()["id"]

        async def blocked_owner() -> str | None:
            row = await deps.db.fetch_one(
                "SELECT lease_owner FROM jobs WHERE id = CAST(:id AS uuid) AND status = 'running'", {"id": job_id}
            )
            return None if row is None else str(row["lease_owner"])

        owner = await eventually(blocked_owner)
        assert processes.worker is not None and owner.endswith(f":{processes.worker.pid}")
        processes.start_worker("rescuer")  # the blocked worker can't sweep: another one must

        async def red() -> bool | None:
            return await asyncio.to_thread(_arq_check, processes.env, "worker") != 0 or None

        await eventually(red, within=8)  # while its loop is blocked, its health key goes stale
        job = await wait_done(client, job_id, within=30)
        assert job["status"] == "succeeded" and job["result"] == 2  # rescued after the lease, run by the rescuer
    terminal = await deps.db.fetch_val(
        "SELECT count(*) FROM job_events WHERE job_id = CAST(:id AS uuid) AND data->>'status' = 'succeeded'",
        {"id": job_id},
    )
    assert terminal == 1  # the blocked attempt, once awake, changed nothing


async def test_a_siblings_graceful_stop_does_not_make_a_healthy_worker_look_dead(processes: Processes) -> None:
    sibling = processes.start_worker("sibling")

    async def both_green() -> bool | None:
        checks = [await asyncio.to_thread(_arq_check, processes.env, name) for name in ("worker", "sibling")]
        return checks == [0, 0] or None

    await eventually(both_green, within=15)
    sibling.send_signal(signal.SIGTERM)  # arq deletes the stopping worker's health key: only its own
    await asyncio.to_thread(sibling.wait, 30)
    assert await asyncio.to_thread(_arq_check, processes.env, "sibling") != 0
    assert await asyncio.to_thread(_arq_check, processes.env, "worker") == 0
