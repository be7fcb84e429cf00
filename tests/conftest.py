"""Real services, isolated: a migrated `outlast_test` database and its own Redis index.

With TEST_DATABASE_URL / TEST_REDIS_URL unset, the tests start their own embedded PostgreSQL and
Valkey in a temporary directory of pytest's (so destructive tests harm nothing else). Before each test: TRUNCATE and
FLUSHDB, never FLUSHALL and never force_rollback (other processes must see the rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httpx
import msgspec
import pytest
from arq.worker import Worker
from redis.asyncio import Redis

from server.app import create_app
from worker import Config, Deps, connect, keys
from worker.config import env_name
from worker.connections import redis_settings
from worker.job_types import load
from worker.migrate import create_database, migrate
from worker.options import worker_options
from worker.queue import RUN_JOB
from worker.run import Runtime, run_job

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
# webhook receivers, canaries and the `hooks` deployment; a headless browser and an origin for its pages
pytest_plugins = ["tests.receivers", "tests.browser"]
TEST_SECRET = "test-secret-that-signs-job-read-tokens-0123456789"


# The longest files first (measured: each takes 1.5-3.5 min): `make test TEST_WORKERS=2` hands whole files to its
# pytest processes in collection order, and one of these started late kept one busy minutes after the other ran out.
LONGEST_FIRST = (
    "tests/test_fuzz.py",
    "tests/test_deploy.py",
    "tests/chaos/test_limits_storm.py",
    "tests/chaos/test_many_processes.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: n for n, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))  # stable: the rest as collected


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Every figure a test reported (`record_property("figure", text)`), listed at the end of the run: read from the
    reports, since under xdist the test ran in another process and only its report came back."""
    figures = [
        (report.head_line, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "figure"
    ]
    if figures:
        terminalreporter.section("figures")
        for test, text in figures:
            terminalreporter.write_line(f"{test}: {text}")


async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = 15.0) -> T:
    """Wait for `check` to return something other than None: the one way tests wait."""
    deadline = time.monotonic() + within
    while (result := await check()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s: {check.__qualname__}")
        await asyncio.sleep(0.02)
    return result


async def notified(deps: Deps, job_id: UUID | None) -> None:
    """Tell followers a job changed, as a writer does after its commit, and wait until the notification is out."""
    deps.notifier.notify(job_id)
    await deps.notifier.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(admin DSN of a PostgreSQL server, Redis URL): from the environment, or embedded ones of this session's
    own (two test runs in one checkout must not share a data directory)."""
    database_url, redis_url = os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not database_url or not redis_url:
            from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey

            data = tmp_path_factory.mktemp("services")
        if not database_url:
            postgres = EmbeddedPostgres(data / "postgres", port=free_port())
            stack.callback(postgres.remove_data)  # also removes a copy kept outside an unreachable tmp dir
            database_url = postgres.start()
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedValkey(data / "valkey", port=free_port())).url()
        yield database_url, redis_url


@pytest.fixture(scope="session")
def worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0")


def _with_database(dsn: str, name: str) -> str:
    base, _, query = dsn.partition("?")
    return f"{base.rpartition('/')[0]}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
async def config(service_urls: tuple[str, str], worker_id: str) -> Config:
    """A Config for a migrated test database, with intervals short enough that tests finish fast."""
    admin, redis_url = service_urls
    name = f"outlast_test_{worker_id}"
    dsn = _with_database(admin, name)
    conn = await asyncpg.connect(_with_database(admin, "postgres"))
    try:  # a fresh database each run: the schema is exactly what migrations/ builds today
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    await create_database(dsn)
    # The suite's commits need not outlive a power cut, and waiting for each one's WAL flush was half its time: the
    # crash tests (tests/chaos/, a private server in test_processes.py) keep every commit durable on their own servers.
    conn = await asyncpg.connect(_with_database(admin, "postgres"))
    try:
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    finally:
        await conn.close()
    await migrate(dsn)
    index = 1 + int(worker_id.removeprefix("gw") or 0)
    return deployment_config(dsn, urlsplit(redis_url)._replace(path=f"/{index}").geturl())


def deployment_config(database_url: str, redis_url: str, **changes: Any) -> Config:
    """The Config every test deployment starts from: intervals short enough that tests finish fast, and limits
    generous enough that tests firing many requests measure what they mean to (limits' own tests tighten them)."""
    settings: dict[str, Any] = {
        "job_modules": "tests.jobs",
        "sweep_interval_s": 1,
        "redispatch_after_s": 1.0,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.5,
        "lease_s": 3.0,
        # A test's worker stopped with a long job still running hands it back after this, not after 25 s: past the
        # 15 s Processes.stop gives it, a teardown killed the worker instead of stopping it.
        "shutdown_grace_s": 3,
        "worker_health_check_interval_s": 1,
        "db_timeout_s": 2.0,
        "retry_after_s": 2,
        "secret_key": TEST_SECRET,
        "submit_rate_per_s": 100_000.0,
        "submit_burst": 100_000,
        "auth_failures_per_min": 100_000,
        "tracing": "off",  # an OTEL_EXPORTER_OTLP_ENDPOINT in a developer's shell traces nothing here (test_tracing.py)
    }
    return Config(database_url=database_url, redis_url=redis_url, **{**settings, **changes})


@pytest.fixture
def spans() -> Iterator[Any]:
    """Tracing on in this process, as `tracing.setup` turns it on, but every span kept in memory as it ends: the
    InMemorySpanExporter (the `otel` extra, which the dev install has)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from worker import tracing

    exporter = InMemorySpanExporter()
    provider = tracing.provider(SimpleSpanProcessor(exporter), service="outlast-test", environ={})
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


@pytest.fixture
async def deps(config: Config) -> AsyncIterator[Deps]:
    async with connect(config) as deps:
        await reset(deps)
        yield deps


async def reset(deps: Deps) -> None:
    """What every test starts from: no job, key, worker, secret, key slot, rate bucket, schedule or tenant but
    `default` (uncapped), and an empty Redis index (FLUSHDB, never FLUSHALL: other runs may share the server)."""
    await deps.db.execute(
        "TRUNCATE jobs, api_keys, workers, webhook_secrets, concurrency_slots, rate_buckets, schedules, workflows"
        " CASCADE"
    )
    await deps.db.execute("DELETE FROM tenants WHERE id <> 'default'")
    await deps.db.execute("UPDATE tenants SET max_running = NULL, running = 0")
    await deps.redis.flushdb()


@pytest.fixture
async def api_key(deps: Deps) -> str:
    """A key of tenant `default`, which every test that goes through the API uses unless it says otherwise."""
    return await keys.create(deps.db, "default", "tests")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def open_app(config: Config, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, every request authenticated with `key` (None: no credentials preset)."""
    app = create_app(config)
    async with app.router.lifespan_context(app):  # ASGITransport does not run the lifespan
        transport = httpx.ASGITransport(app=app)
        headers = {} if key is None else bearer(key)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client


@pytest.fixture
async def client(config: Config, deps: Deps, api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, every request authenticated with `api_key`."""
    async with open_app(config, api_key) as client:
        yield client


@pytest.fixture
def make_worker(config: Config, deps: Deps) -> Callable[[], Worker]:
    """An in-process arq worker in burst mode (it returns once the queue is empty, deferred retries included)."""

    def make() -> Worker:
        options = worker_options(config)  # the deployment's, but for what an in-process burst worker needs
        options.update(
            burst=True,
            handle_signals=False,
            poll_delay=0.01,
            max_jobs=20,
            redis_settings=redis_settings(config),  # no retries through an outage: a test's outage is on purpose
            on_startup=None,
            on_shutdown=None,
            ctx={"deps": deps, "runtime": Runtime.of(deps, load(config.job_modules))},
        )
        return Worker(**options)

    assert run_job.__name__ == RUN_JOB
    return make


async def run_burst(worker: Worker) -> None:
    try:
        await worker.main()
    finally:
        await worker.close()


@pytest.fixture
def drain(make_worker: Callable[[], Worker]) -> Callable[[], Awaitable[None]]:
    """Run an in-process burst worker until the queue is empty."""

    async def drain() -> None:
        await run_burst(make_worker())

    return drain


async def job_row(deps: Deps, job_id: UUID | str) -> dict[str, Any]:
    record = await deps.db.fetch_one("SELECT * FROM jobs WHERE id = :id", {"id": UUID(str(job_id))})
    assert record is not None
    return dict(record._mapping)


async def wait_ready(url: str, *, within: float = 30.0) -> None:
    """Until `url`/readyz answers 200: the web process is up and reaches both stores."""
    async with httpx.AsyncClient(base_url=url) as client:

        async def ready() -> bool | None:
            try:
                return (await client.get("/readyz")).status_code == 200 or None
            except httpx.TransportError:
                return None

        await eventually(ready, within=within)


# -- real processes ----------------------------------------------------------------------------------


def process_env(config: Config, **extra: str) -> dict[str, str]:
    """The environment that makes a process build `config`: every setting it changes from the defaults, by the name
    its process reads (worker/config.py), so a test's process runs with exactly the test's Config."""
    ours = {env_name(f.name) for f in msgspec.structs.fields(Config)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_") and k not in ours}
    defaults = Config()
    for f in msgspec.structs.fields(Config):
        value = getattr(config, f.name)
        if value != getattr(defaults, f.name):
            env[env_name(f.name)] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(extra)
    return env


ARQ_LOGS = "worker.logs.ARQ_LOG_CONFIG"  # as the Procfile names it


class Processes:
    """A real web process and a real arq worker, as the Procfile runs them."""

    def __init__(self, env: dict[str, str], logs: Path, key: str = "") -> None:
        self.port = free_port()
        self.env, self.logs = {**env, "PORT": str(self.port)}, logs
        self.headers = bearer(key) if key else {}  # what a client of these processes sends
        self.url = f"http://127.0.0.1:{self.port}"
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None  # the first worker started
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def start_web(self) -> None:
        """The web as the Procfile starts it (`python -m server`, on $PORT), on the loopback address only."""
        self.web = self._spawn("web", [sys.executable, "-m", "server", "--host", "127.0.0.1"])

    def start_worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        """A worker whose health key and log are named `name`."""
        argv = [sys.executable, "-m", "arq", "worker.settings.WorkerSettings", "--custom-log-dict", ARQ_LOGS]
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv, env={**self.env, "OUTLAST_WORKER_NAME": name}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        self.workers.append(proc)
        self.worker = self.worker or proc
        return proc

    async def ready(self) -> None:
        await wait_ready(self.url)

    def stop(self) -> None:
        for proc in (self.web, *self.workers):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process can't act on SIGTERM
                proc.send_signal(signal.SIGTERM)
        for proc in (self.web, *self.workers):
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """A client of the web process, authenticated with the key the processes were started for."""
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, **kwargs)


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


@contextlib.asynccontextmanager
async def running(config: Config, api_key: str, tmp_path: Path) -> AsyncIterator[Processes]:
    """A web and a worker process of `config`, ready, stopped afterwards."""
    procs = Processes(process_env(config), tmp_path, api_key)
    procs.start_web()
    procs.start_worker()
    try:
        await procs.ready()
        yield procs
    finally:
        procs.stop()


@pytest.fixture
async def processes(config: Config, deps: Deps, api_key: str, tmp_path: Path) -> AsyncIterator[Processes]:
    async with running(config, api_key, tmp_path) as procs:
        yield procs


async def wait_done(client: httpx.AsyncClient, job_id: str, *, within: float = 30.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        return job if job["done"] else None

    return await eventually(done, within=within)


@pytest.fixture
async def pg_connection(config: Config) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(config.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis(config: Config) -> AsyncIterator[Redis]:
    client = Redis.from_url(config.redis_url)
    try:
        yield client
    finally:
        await client.aclose()
