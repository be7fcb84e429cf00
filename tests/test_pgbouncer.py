"""Every process through Debian's PgBouncer in transaction pooling, as Heroku, Render and Supabase put it in front of
PostgreSQL: migrate (twice), `outlast keys create`, real web and worker processes under 200 concurrent submits, a
revoked key heard by polling within its bound, and a SIGKILLed worker's job rescued.

The pool is smaller than its clients, so that transactions of different clients really share server connections:
what broke before was a session's state (a named prepared statement, an advisory lock, a LISTEN) outliving the
transaction that made it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import pytest

from server.keycache import KeyCache
from tests.conftest import ROOT, Processes, bearer, eventually, free_port, process_env, running, wait_done
from tests.test_auth import revoke_unheard
from worker import Config, Deps, connect, keys
from worker.migrate import MIGRATIONS

pytestmark = pytest.mark.slow

PGBOUNCER = Path("/usr/sbin/pgbouncer")  # Debian's package: 1.18 in bookworm, without prepared statement support
SERVER_CONNECTIONS = 5  # fewer than the web's and the worker's pools together: clients take turns on them
POLLING = "polling for key changes"  # what the web logs, once, when it can't LISTEN


def _install() -> None:
    """Debian's pgbouncer, when absent: as root, apt-get it; else skip, saying how to get it."""
    if PGBOUNCER.exists():
        return
    if os.geteuid() != 0:
        pytest.skip(f"{PGBOUNCER} is absent and only root can install it: apt-get install pgbouncer")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "pgbouncer"], env=env, check=True, capture_output=True, timeout=300
    )


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
async def pgbouncer(
    service_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, int]]:
    """(host, port) of a pgbouncer in transaction pooling in front of the tests' PostgreSQL, any database."""
    _install()
    server = urlsplit(service_urls[0])
    root = tmp_path_factory.mktemp("pgbouncer")
    port = free_port()
    ini = root / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={server.hostname} port={server.port or 5432} user={server.username or 'postgres'}"
        + (f" password={server.password}" if server.password else "")
        + "\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\n"
        f"default_pool_size = {SERVER_CONNECTIONS}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
        "max_client_conn = 1000\nmax_db_connections = 0\n"
        "logfile =\npidfile =\nadmin_users =\n"
    )
    # It refuses to run as root: as root, it reads its ini and then becomes `nobody`.
    argv = [str(PGBOUNCER), *(["-u", "nobody"] if os.geteuid() == 0 else []), str(ini)]
    proc = _spawn(argv, root / "pgbouncer.log")

    async def listens() -> bool | None:
        assert proc.poll() is None, (root / "pgbouncer.log").read_text()
        try:  # a plain socket first: asyncpg refused a connection leaves a coroutine unawaited behind
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return None
        writer.close()
        await writer.wait_closed()
        return True

    try:
        await eventually(listens, within=30)
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
        await conn.close()  # it reaches PostgreSQL
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(10)


def through(pooler: tuple[str, int], dsn: str) -> str:
    """`dsn`'s database, reached through the pooler."""
    parts = urlsplit(dsn)
    return parts._replace(netloc=f"{parts.username or 'postgres'}@{pooler[0]}:{pooler[1]}").geturl()


@pytest.fixture
def pooled(config: Config, pgbouncer: tuple[str, int]) -> Config:
    """The tests' deployment with DATABASE_URL through the pooler, as a PaaS gives it, and no direct URL."""
    return msgspec.structs.replace(
        config, database_url=through(pgbouncer, config.database_url), database_pooler="transaction"
    )


def command(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


async def advisory_locks(direct_dsn: str) -> int:
    conn = await asyncpg.connect(direct_dsn)
    try:
        held = "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        held += " WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        return int(await conn.fetchval(held))
    finally:
        await conn.close()


async def test_migrate_through_pgbouncer_twice_at_once_then_again_and_no_lock_outlives_it(
    config: Config, pgbouncer: tuple[str, int]
) -> None:
    name = "outlast_pgbouncer_migrate"
    admin = await asyncpg.connect(config.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    direct = config.database_url.rpartition("/")[0] + f"/{name}"
    env = {**os.environ, "DATABASE_URL": through(pgbouncer, direct), "OUTLAST_DATABASE_POOLER": "transaction"}
    env.pop("OUTLAST_DIRECT_DATABASE_URL", None)
    argv = (sys.executable, "-m", "worker.migrate")

    first, second = await asyncio.gather(*(asyncio.to_thread(command, env, *argv) for _ in range(2)))
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    everything = sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    lines = [line for out in (first.stderr, second.stderr) for line in out.splitlines()]
    applied = [line.removeprefix("applied: ").split(", ") for line in lines if line.startswith("applied: ")]
    # The lock made them take turns: each file applied once, by one of them.
    assert sorted(n.strip() for names in applied for n in names if n.strip().endswith(".sql")) == everything
    again = await asyncio.to_thread(command, env, *argv)
    assert again.returncode == 0 and "migrations: up to date" in again.stderr, again.stderr
    # A session lock would still be held by the server connection the pooler keeps open.
    assert await advisory_locks(direct) == 0


async def test_outlast_keys_create_through_pgbouncer_makes_keys_that_verify(pooled: Config, deps: Deps) -> None:
    env = {**process_env(pooled), "PATH": os.environ.get("PATH", "")}
    outlast = str(Path(sys.executable).parent / "outlast")
    made = [await asyncio.to_thread(command, env, outlast, "keys", "create", "default") for _ in range(3)]
    assert [m.returncode for m in made] == [0, 0, 0], [m.stderr for m in made]
    for m in made:
        assert await keys.verify(deps.db, m.stdout.splitlines()[-1]) == keys.Grant("default", False)
    listed = await asyncio.to_thread(command, env, outlast, "keys", "list")
    assert listed.returncode == 0, listed.stderr


@pytest.fixture
async def through_pgbouncer(pooled: Config, deps: Deps, api_key: str, tmp_path: Path) -> AsyncIterator[Processes]:
    """A real web and worker whose only way to PostgreSQL is the pooler."""
    async with running(pooled, api_key, tmp_path) as procs:
        yield procs


async def test_200_concurrent_submits_through_pgbouncer_are_accepted_run_and_read_back(
    through_pgbouncer: Processes, deps: Deps
) -> None:
    procs = through_pgbouncer
    async with procs.client(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/jobs", json={"type": "square_sum", "input": {"data": [i, 1]}}) for i in range(200))
        )
        assert [a.status_code for a in answers] == [202] * 200, {a.status_code: a.text for a in answers}
        ids = [a.json()["id"] for a in answers]

        async def all_succeeded() -> bool | None:
            done = await deps.db.fetch_val("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            return done == 200 or None

        await eventually(all_succeeded, within=60)
    # New connections for the reads: the 200 kept alive idled through the wait, past uvicorn's keep-alive timeout,
    # and one the server closes just as the client sends on it is refused with no answer (HTTP's own race).
    async with procs.client(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        jobs = await asyncio.gather(*(client.get(f"/v1/jobs/{job_id}") for job_id in ids))
        assert [j.status_code for j in jobs] == [200] * 200
        assert [j.json()["result"] for j in jobs] == [i * i + 1 for i in range(200)]
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "ok", ready.text
    log = procs.log("web")
    assert "Exception in ASGI application" not in log and "prepared statement" not in log
    assert "prepared statement" not in procs.log("worker")


async def test_a_key_revoked_through_pgbouncer_stops_working_within_the_polling_bound(
    through_pgbouncer: Processes, deps: Deps, api_key: str
) -> None:
    procs = through_pgbouncer
    assert procs.log("web").count(POLLING) == 1  # it says, once, that it polls and why
    env = {**procs.env, "PATH": os.environ.get("PATH", "")}
    outlast = str(Path(sys.executable).parent / "outlast")
    cached = await keys.create(deps.db, "default")
    async with procs.client() as client:
        assert (await client.get("/v1/jobs")).status_code == 200
        assert (await client.get("/v1/jobs", headers=bearer(cached))).status_code == 200
        await revoke_unheard(deps, cached)  # the row says revoked, the revision did not move
        # Polling still caches: only a lookup would see that revocation.
        assert (await client.get("/v1/jobs", headers=bearer(cached))).status_code == 200
        revoked = await asyncio.to_thread(command, env, outlast, "keys", "revoke", api_key)
        assert revoked.returncode == 0, revoked.stderr

        async def refused() -> bool | None:
            return (await client.get("/v1/jobs")).status_code == 401 or None

        await eventually(refused, within=KeyCache.POLL_BOUND_S)
        # The revision moved: everything cached went, the other key's unheard revocation with it.
        assert (await client.get("/v1/jobs", headers=bearer(cached))).status_code == 401


async def test_with_a_direct_url_the_web_listens_past_pgbouncer_and_hears_a_revocation(
    pooled: Config, config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    direct = msgspec.structs.replace(pooled, direct_database_url=config.database_url)
    async with running(direct, api_key, tmp_path) as procs, procs.client() as client:
        assert (await client.get("/v1/jobs")).status_code == 200
        assert await keys.revoke(deps.db, api_key)

        async def refused() -> bool | None:
            return (await client.get("/v1/jobs")).status_code == 401 or None

        await eventually(refused, within=KeyCache.POLL_BOUND_S)
        assert POLLING not in procs.log("web")


async def test_a_worker_sigkilled_mid_job_through_pgbouncer_has_its_job_rescued_and_succeed(
    through_pgbouncer: Processes, deps: Deps
) -> None:
    procs = through_pgbouncer
    async with procs.client() as client:
        submitted = await client.post("/v1/jobs", json={"type": "sleep", "input": {"seconds": 2, "steps": 4}})
        job_id = submitted.json()["id"]

        async def running_on_the_worker() -> bool | None:
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            return job["status"] == "running" or None

        await eventually(running_on_the_worker)
        assert procs.worker is not None
        procs.worker.send_signal(signal.SIGKILL)
        procs.worker.wait()
        procs.start_worker("rescuer")
        job = await wait_done(client, job_id, within=60)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job


async def test_through_pgbouncer_a_named_statement_meets_a_server_connection_without_it_and_unnamed_ones_do_not(
    pooled: Config,
) -> None:
    """Why the statement cache is off (and that this pooler pools): a transaction holds one server connection, so
    the other client's statement is prepared on a second; the next transaction may get the first."""
    for cache, fails in ((100, True), (0, False)):
        holder = await asyncpg.connect(pooled.database_url, statement_cache_size=cache)
        other = await asyncpg.connect(pooled.database_url, statement_cache_size=cache)
        try:
            async with holder.transaction():
                await holder.execute("SELECT 1")
                assert await other.fetchval("SELECT $1::int", 1) == 1
            if fails:
                with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                    await other.fetchval("SELECT $1::int", 2)
            else:
                assert await other.fetchval("SELECT $1::int", 2) == 2
        finally:
            await holder.close()
            await other.close()


async def test_a_process_not_told_of_the_pooler_logs_that_it_answers_through_one(
    pooled: Config, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    advice = "set OUTLAST_DATABASE_POOLER=transaction"
    with caplog.at_level(logging.WARNING, logger="outlast.db"):
        async with connect(msgspec.structs.replace(pooled, database_pooler="none")):
            pass
        assert [advice in message for message in caplog.messages] == [True], caplog.messages
        caplog.clear()
        for told_or_direct in (pooled, config):
            async with connect(told_or_direct):
                pass
        assert not any(advice in message for message in caplog.messages), caplog.messages
