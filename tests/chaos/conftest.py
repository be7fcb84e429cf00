"""The chaos harness: real web and worker processes against a PostgreSQL and a Valkey of this session's own,
started here under a temporary directory, so that killing, flushing and restarting them harms nothing else.

Each test gets a clean slate (TRUNCATE, FLUSHALL, both stores running) and a `Cluster`: the processes it starts,
a tiny restarting supervisor, the faults it injects (with their wall-clock times) and read helpers. Every figure
a test measures is printed, attached to the report (`record_property`) and listed again at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from tests.chaos.jobs import CREATE_TABLE
from tests.conftest import ROOT, bearer, deployment_config, eventually, free_port, process_env
from worker import TERMINAL, Config, connect, database, keys
from worker.connections import QUEUE
from worker.migrate import create_database, migrate
from worker.queue import message

# Short enough that a whole crash-and-rescue cycle takes seconds; the bounds the tests check derive from these.
LEASE_S = 3.0
SWEEP_INTERVAL_S = 1
RESCUE_BOUND_S = LEASE_S + SWEEP_INTERVAL_S + 1.0  # the bound on kill -> rescue


@pytest.fixture
def figure(request: pytest.FixtureRequest, record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """Report a measured figure: printed, in the junit XML, and in the run's closing 'figures' section."""

    def report(text: str) -> None:
        print(f"\n[chaos] {request.node.name}: {text}")
        record_property("figure", text)

    return report


# -- the stores ---------------------------------------------------------------------------------------------------


@dataclass
class Stores:
    postgres: Any  # worker.tools.embedded.EmbeddedPostgres
    valkey: Any  # worker.tools.embedded.EmbeddedValkey
    dsn: str
    redis_url: str

    def ensure_up(self) -> None:
        self.postgres.start()  # no-op while running
        self.valkey.start()

    def wipe_valkey(self) -> None:
        """Kill -9 the Valkey server and delete its data: the next start() is a fresh, empty server."""
        self.valkey.kill()
        for name in ("appendonlydir", "dump.rdb"):
            path = self.valkey.root / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
async def chaos_stores(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stores]:
    from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey

    root = tmp_path_factory.mktemp("chaos")
    postgres = EmbeddedPostgres(root / "postgres", port=free_port())
    valkey = EmbeddedValkey(root / "valkey", port=free_port())
    try:
        await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(valkey.start)
        dsn = postgres.dsn("outlast_chaos")
        await create_database(dsn)
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(CREATE_TABLE)
        finally:
            await conn.close()
        yield Stores(postgres, valkey, dsn, valkey.url())
    finally:
        await asyncio.to_thread(valkey.stop)
        await asyncio.to_thread(postgres.remove_data)


def chaos_config(stores: Stores) -> Config:
    return deployment_config(
        stores.dsn, stores.redis_url, job_modules="tests.jobs,tests.chaos.jobs", sweep_interval_s=SWEEP_INTERVAL_S,
        lease_s=LEASE_S,
    )  # fmt: skip


# -- the cluster --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str  # the process's name (a worker's OUTLAST_WORKER_NAME, or "web")
    pid: int
    sig: signal.Signals
    at: float  # time.time() just before the signal was sent


@dataclass(frozen=True)
class Exit:
    name: str
    pid: int
    code: int
    at: float  # when the supervisor noticed


@dataclass(frozen=True)
class Event:
    seq: int
    status: str
    attempt: int
    at: float  # job_events.created_at as epoch seconds (the database clock; same host as ours)
    data: dict[str, Any]


@dataclass
class Cluster:
    """The processes one test runs, the faults it injects, and what it reads back."""

    stores: Stores
    config: Config
    logs: Path
    db: asyncpg.Pool
    redis: Redis
    env: dict[str, str] = field(init=False)
    url: str = field(init=False)
    web: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    _worker_env: dict[str, dict[str, str]] = field(default_factory=dict)
    _supervisor: asyncio.Task[None] | None = None
    _http: httpx.AsyncClient | None = None
    key: str = ""  # an API key of tenant `default`, sent with every request of `http`

    def __post_init__(self) -> None:
        self.env = process_env(self.config, OUTLAST_SHUTDOWN_GRACE_S="1")
        self.url = f"http://127.0.0.1:{free_port()}"

    # processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            log.write(f"=== chaos: started {name} as pid {proc.pid}\n".encode())
        self.started.append(proc)
        return proc

    def start_web(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--no-access-log"]  # as the Procfile does
        self.web = self._spawn("web", argv, {**self.env, "PORT": self.url.rpartition(":")[2]})
        return self.web

    def start_worker(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        """A worker named `name` (its health key and log); `extra` env is kept for the supervisor's restarts."""
        self._worker_env.setdefault(name, {**self.env, "OUTLAST_WORKER_NAME": name, **extra})
        proc = self._spawn(
            name, [sys.executable, "-m", "arq", "worker.settings.WorkerSettings"], self._worker_env[name]
        )
        self.workers[name] = proc
        return proc

    def pid(self, name: str) -> int:
        return self.workers[name].pid

    def owner(self, name: str) -> str:
        """The jobs.lease_owner this worker writes (worker/run.py's OWNER)."""
        return f"{os.uname().nodename}:{self.pid(name)}"

    async def web_ready(self) -> None:
        async def up() -> bool | None:
            try:
                return (await self.http.get("/readyz")).status_code == 200 or None
            except httpx.TransportError:
                return None

        await eventually(up, within=30)

    async def worker_ready(self, *names: str) -> None:
        """Until each worker's arq health key exists: it has started and is polling the queue."""
        for name in names:

            async def polling(name: str = name) -> bool | None:
                return bool(await self.redis.exists(f"{QUEUE}:health-check:{name}")) or None

            await eventually(polling, within=30)

    def signal(self, name: str, sig: signal.Signals) -> Fault:
        proc = self.web if name == "web" else self.workers[name]
        assert proc is not None
        fault = Fault(name, proc.pid, sig, time.time())
        proc.send_signal(sig)
        self.faults.append(fault)
        return fault

    def supervise(self, *names: str) -> None:
        """Restart any of these workers as soon as it exits, whatever killed it (a tiny process manager)."""

        async def loop() -> None:
            while True:
                for name in names:
                    proc = self.workers[name]
                    if (code := proc.poll()) is not None:
                        self.exits.append(Exit(name, proc.pid, code, time.time()))
                        self.start_worker(name)
                await asyncio.sleep(0.05)

        self._supervisor = asyncio.create_task(loop())

    async def start_supervised(self, *names: str) -> None:
        """The web and these workers, each ready, the workers restarted whenever they exit: a storm's opening."""
        self.start_web()
        for name in names:
            self.start_worker(name)
        await self.web_ready()
        await self.worker_ready(*names)
        self.supervise(*names)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        live = [p for p in self.started if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGCONT)  # a stopped process can't act on SIGTERM
            proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._http is not None:
            await self._http.aclose()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # the API

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            limits = httpx.Limits(max_connections=50)
            self._http = httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits, headers=bearer(self.key))
        return self._http

    async def submit(self, type: str, input: dict[str, Any] | None = None, **extra: Any) -> str:
        response = await self.http.post("/v1/jobs", json={"type": type, "input": input or {}, **extra})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    # reads, straight from the database

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        for attempt in range(10):  # our own pool's connections die with a restarted server too
            try:
                return await self.db.fetch(sql, *args)
            except database.UNAVAILABLE:
                if attempt == 9:
                    raise
                self.db.expire_connections()
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def rows(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """The jobs (all, or those of `ids`) by id, with JSON columns decoded."""
        records = await self.fetch(
            "SELECT * FROM jobs WHERE $1::uuid[] IS NULL OR id = ANY($1::uuid[])", None if ids is None else list(ids)
        )
        rows = {}
        for record in records:
            row = dict(record)
            for column in ("result", "error", "progress", "metadata", "input"):
                if row[column] is not None:
                    row[column] = msgspec.json.decode(row[column])
            rows[str(row["id"])] = row
        return rows

    async def statuses(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in await self.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY 1")}

    async def all_done(self, n: int, *, within: float) -> dict[str, dict[str, Any]]:
        """Until `n` jobs exist and every one is terminal: then the rows. Else fail, describing the live ones."""

        async def done() -> dict[str, dict[str, Any]] | None:
            rows = await self.rows()
            return rows if len(rows) == n and all(r["status"] in TERMINAL for r in rows.values()) else None

        try:
            return await eventually(done, within=within)
        except AssertionError as exc:
            live = [r for r in (await self.rows()).values() if r["status"] not in TERMINAL]
            raise AssertionError(f"{exc}; still live: {[await self.describe(r) for r in live]}") from None

    async def orphaned(self, row: dict[str, Any]) -> bool:
        """A queued job whose arq message is marked in progress: taken by a worker that has not claimed it (yet)."""
        return bool(await self.redis.exists(f"arq:in-progress:{message(row['id'], row['attempt'])}"))

    async def describe(self, row: dict[str, Any]) -> str:
        """A live job as the database and Redis see it: what to look at when one never ends."""
        text = message(row["id"], row["attempt"])
        score = await self.redis.zscore(QUEUE, text)
        in_progress = await self.redis.exists(f"arq:in-progress:{text}")
        return (
            f"{row['id']} {row['status']} attempt={row['attempt']} owner={row['lease_owner']} "
            f"dispatched_at={row['dispatched_at']} next_run_at={row['next_run_at']}"
            f" cancel_requested_at={row['cancel_requested_at']};"
            f" redis {text}: queued={score is not None} in_progress={bool(in_progress)}"
        )

    async def events(self) -> dict[str, list[Event]]:
        """Every job's status events in order."""
        records = await self.fetch(
            "SELECT job_id, seq, data, extract(epoch FROM created_at)::float8 AS at FROM job_events"
            " WHERE name = 'status' ORDER BY job_id, seq"
        )
        events: dict[str, list[Event]] = {}
        for r in records:
            data = msgspec.json.decode(r["data"])
            events.setdefault(str(r["job_id"]), []).append(
                Event(r["seq"], data["status"], data["attempt"], r["at"], data)
            )
        return events

    async def attempts(self) -> dict[str, list[dict[str, Any]]]:
        """What the chaos job types recorded of each attempt (tests/chaos/jobs.py), by job, in start order."""
        records = await self.fetch("SELECT * FROM chaos_attempts ORDER BY job_id, started_at")
        attempts: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            attempts.setdefault(str(r["job_id"]), []).append(dict(r))
        return attempts


def lifecycle_problems(events: list[Event]) -> list[str]:
    """What is wrong with one job's status events: it must start queued, never run two attempts without a
    status change in between, number attempts 1, 2, 3..., and end with exactly one terminal event."""
    problems = []
    if not events or events[0].status != "queued" or events[0].attempt != 0:
        problems.append("does not start queued at attempt 0")
    expected, previous, terminal = 1, "", 0
    for event in events:
        if terminal:
            problems.append(f"{event.status} after the terminal event")
        if event.status == "running":
            if previous == "running":
                problems.append(f"attempt {event.attempt} began while attempt {event.attempt - 1} was running")
            if event.attempt != expected:
                problems.append(f"running attempt {event.attempt}, expected {expected}")
            expected = event.attempt + 1
        terminal += event.status in TERMINAL
        previous = event.status
    if terminal != 1:
        problems.append(f"{terminal} terminal events")
    return problems


def overlapping_attempts(
    ids: Iterable[str], attempts: dict[str, list[dict[str, Any]]], faults: list[Fault]
) -> list[str]:
    """What the attempts themselves recorded (tests/chaos/jobs.py), checked: each ended, or its process was killed,
    before the next of its job started, and no attempt number ran twice."""
    killed_at = {f.pid: f.at for f in faults}
    problems = []
    for job_id in ids:
        spans = []
        for a in attempts.get(job_id, []):
            end = a["ended_at"] if a["ended_at"] is not None else killed_at.get(a["pid"])
            if end is None:
                problems.append(f"attempt {a['attempt']} of {job_id} never ended and its worker was not killed")
                continue
            spans.append((a["started_at"], end, a["attempt"]))
        if [s[2] for s in spans] != sorted({s[2] for s in spans}):
            problems.append(f"{job_id}: an attempt ran twice: {spans}")
        for (_, end, n), (start, _, m) in itertools.pairwise(spans):
            if end > start:
                problems.append(f"{job_id}: attempt {m} started {end - start:.3f}s before attempt {n} ended")
    return problems


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool | None]]:
    """A check for `eventually` from a plain predicate on what the test has gathered so far."""

    async def check() -> bool | None:
        return predicate() or None

    return check


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.fixture
async def cluster(chaos_stores: Stores, tmp_path: Path) -> AsyncIterator[Cluster]:
    await asyncio.to_thread(chaos_stores.ensure_up)  # a previous test may have failed in the middle of an outage
    db = await asyncpg.create_pool(chaos_stores.dsn, min_size=0, max_size=4)  # no floor to restore in an outage
    redis = Redis.from_url(chaos_stores.redis_url)
    await db.execute("TRUNCATE jobs, chaos_attempts, concurrency_slots, rate_buckets, schedules, workflows CASCADE")
    await redis.flushall()
    cluster = Cluster(chaos_stores, chaos_config(chaos_stores), tmp_path, db, redis)
    async with connect(cluster.config) as deps:
        cluster.key = await keys.create(deps.db, "default", "chaos")
    try:
        yield cluster
    finally:
        await cluster.stop()
        await redis.aclose()
        await db.close()


@pytest.fixture(autouse=True)
def _no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Everything a chaos test starts, it stops: no web or worker of this checkout survives the test."""
    yield
    if "cluster" in request.fixturenames:
        assert not leftovers(), leftovers()


def leftovers() -> list[str]:
    """Pids of live processes started with this harness's environment (web or worker) from this checkout and this
    pytest worker: another checkout's suite, or another xdist worker of this one, may be running its own."""
    markers = [b"OUTLAST_JOB_MODULES=tests.jobs,tests.chaos.jobs\0"]
    if xdist_worker := os.environ.get("PYTEST_XDIST_WORKER"):  # a child inherits it (process_env keeps the rest)
        markers.append(f"PYTEST_XDIST_WORKER={xdist_worker}\0".encode())
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            env = environ.read_bytes()
            if (
                all(marker in env for marker in markers)
                and int(environ.parent.name) != os.getpid()
                and (environ.parent / "cwd").resolve() == ROOT
            ):
                state = (environ.parent / "stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    found.append(f"{environ.parent.name}: {(environ.parent / 'cmdline').read_bytes()!r}")
    return found
