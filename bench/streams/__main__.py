"""python -m bench.streams: what Outlast's event streams cost, next to a bare streaming app, in one run.

    .venv/bin/python -m bench.streams [--streams 10000] [--watchers 1000] [--rounds 3] [--only running ...]

Four measurements, each in ROUNDS rounds that alternate which side goes first (so the drift of a shared machine
falls on both sides), reported as ratios, min / median / max over the rounds:
  idle     STREAMS idle streams on one web process: RSS per stream, Outlast / bare; and that none was dropped
           (after the hold, one more event must reach every stream)
  fanout   one job's progress to WATCHERS streams: CPU per delivery, and publish->delivered p100, Outlast / bare
  load     POST + GET req/s on Outlast with IDLE_UNDER_LOAD idle streams open / with none
  running  issue 20's S5: RUNNING_STREAMS streams following RUNNING_JOBS running jobs that each report every
           second, written as a worker's pulse writes them: CPU per delivery, Outlast / bare, and every delivery's
           publish->received (Outlast's p99: at most 250 ms)
The bare app (bench/streams/bare.py) is the same stack fanning Redis pub/sub out to streams, nothing more. Every
server is a fresh uvicorn process per round, with the Procfile's flags. Its own embedded PostgreSQL and Valkey
(under .outlast/bench-streams), loopback only; about 5 minutes, stopped at 10.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from uuid_utils.compat import uuid7

from server.auth import AuthState
from worker import Config, Deps, Progress, connect, keys, store
from worker.claim import claim_many
from worker.heartbeat import beat_many
from worker.migrate import create_database, migrate

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".outlast" / "bench-streams"
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
DEADLINE_S = 600.0
SECRET = secrets.token_urlsafe(32)  # Outlast's OUTLAST_SECRET_KEY for this run: it signs the events links
RUNNING_P99_MS = 250.0  # S5's goal: a running job's report reaches its streams within this, at the 99th percentile
UVICORN = ("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--backlog", "4096")


@dataclass(frozen=True)
class Settings:
    streams: int = 10_000
    stream_jobs: int = 100  # the idle streams follow this many jobs (keys, on the bare side)
    clients: int = 4  # processes holding the idle streams
    hold_s: float = 12.0  # past one keep-alive interval (10 s), so every stream has had one
    watchers: int = 1_000
    fanout_events: int = 20
    fanout_interval_s: float = 0.25  # the fastest a job's progress is written (OUTLAST_PROGRESS_INTERVAL_S)
    idle_under_load: int = 1_000
    load_s: float = 6.0  # per slice; four slices per round
    load_connections: int = 32
    # S5: 10,000 streams on 1,000 running jobs, 10 each (a job watched in several tabs, or by several people): at
    # 10,000 jobs the write side (10,000 rows and events a second into PostgreSQL, S1's subject) would share the two
    # cores with the web it measures. --running-jobs 10000 gives each job one stream.
    running_jobs: int = 1_000
    running_streams: int = 10_000
    running_s: float = 10.0  # the window of reports: 100,000 deliveries
    report_s: float = 1.0  # each job's progress this often (the issue's `sleep` jobs: a step a second)
    tick_s: float = 0.25  # the worker's pulse writes what was reported this often (OUTLAST_PROGRESS_INTERVAL_S)
    rounds: int = 3
    only: tuple[str, ...] = ("idle", "fanout", "load", "running")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_open_files(needed: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"this needs {needed} open files per process; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers and clients we start inherit it


def _proc(pid: int, name: str) -> str:
    return (Path("/proc") / str(pid) / name).read_text()


def rss_kib(pid: int) -> int:
    line = next(x for x in _proc(pid, "status").splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


def cpu_s(pid: int) -> float:
    fields = _proc(pid, "stat").rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not true within {within}s: {what}")
        await asyncio.sleep(0.2)


class Server:
    """A uvicorn process, started fresh for each round."""

    def __init__(self, name: str, factory: str, env: dict[str, str]) -> None:
        self.name, self.factory, self.env = name, factory, env
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> Server:
        log = (DATA / "logs" / f"{self.name}.log").open("ab")
        argv = [PYTHON, "-m", "uvicorn", "--factory", self.factory, "--port", str(self.port), *UVICORN]
        self.proc = await asyncio.create_subprocess_exec(*argv, env=self.env, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:

            async def up() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/healthz")).status_code == 200
                return False

            await eventually(up, within=60, what=f"{self.name} answers /healthz")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Clients:
    """Client processes (bench/streams/client.py) holding streams, driven over their stdin and stdout."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Clients:
        for _ in range(self.count):
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    PYTHON, "-m", "bench.streams.client", cwd=ROOT, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, limit=2**26,
                )
            )  # fmt: skip
        return self

    async def _ask(self, proc: asyncio.subprocess.Process, command: dict[str, Any]) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(command).encode() + b"\n")
        await proc.stdin.drain()
        answer: dict[str, Any] = json.loads(await proc.stdout.readline())
        return answer

    async def open(self, port: int, paths: list[str]) -> tuple[int, int]:
        shares = [paths[i :: self.count] for i in range(self.count)]
        answers = await asyncio.gather(
            *(
                self._ask(p, {"open": {"port": port, "paths": s, "concurrency": 64}})
                for p, s in zip(self.procs, shares, strict=True)
            )
        )
        return sum(a["opened"] for a in answers), sum(a["failed"] for a in answers)

    async def counts(self) -> dict[int, int]:
        counted: dict[int, int] = {}
        for answer in await asyncio.gather(*(self._ask(p, {"count": True}) for p in self.procs)):
            for marker, n in answer["delivered"].items():
                counted[int(marker)] = counted.get(int(marker), 0) + n
        return counted

    async def report(self) -> tuple[dict[int, list[float]], int]:
        delivered: dict[int, list[float]] = {}
        ended = 0
        for answer in await asyncio.gather(*(self._ask(p, {"report": True}) for p in self.procs)):
            for marker, times in answer["delivered"].items():
                delivered.setdefault(int(marker), []).extend(times)
            ended += answer["ended"]
        return delivered, ended

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.stdin is not None and proc.returncode is None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(b'{"close": true}\n')
                    proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def delivered_to_all(clients: Clients, markers: range, count: int, *, within: float) -> dict[int, list[float]]:
    found: dict[int, list[float]] = {}

    async def check() -> bool:
        nonlocal found
        found, _ = await clients.report()
        return all(len(found.get(m, ())) >= count for m in markers)

    with contextlib.suppress(RuntimeError):  # a shortfall is reported, not raised
        await eventually(check, within=within, what="every stream got every event")
    return found


# -- the two sides ----------------------------------------------------------------------------------


class Side:
    """What differs between Outlast and the bare app: how streams are named and how an event is published."""

    name = ""
    factory = ""

    def __init__(self, deps: Deps, env: dict[str, str]) -> None:
        self.deps, self.env = deps, env

    async def reset(self) -> None:
        await self.deps.db.execute("TRUNCATE jobs CASCADE")
        await self.deps.redis.flushdb()

    async def keys(self, count: int) -> list[str]:
        return [f"k{i}" for i in range(count)]

    def path(self, key: str) -> str:
        raise NotImplementedError

    async def start_events(self, keys: list[str]) -> None:
        """Whatever must happen before `publish` can send events on `keys`."""

    async def publish(self, key: str, marker: int, fraction: float) -> float:
        """Write (if the side writes anything) and publish one event; return the time of the publish."""
        return await self.publish_many([key], marker, fraction)

    async def publish_many(self, keys: list[str], marker: int, fraction: float) -> float:
        """The same event for each of `keys`, written and published as one worker's tick does; the publish's time."""
        raise NotImplementedError


class Outlast(Side):
    """Outlast's web process, each stream opened with its job's signed events link, as a browser's EventSource
    (which can't send an Authorization header) opens it."""

    name, factory = "outlast", "server.app:create_app"

    def __init__(self, deps: Deps, env: dict[str, str], config: Config) -> None:
        # The per-key limits are policies, not costs: lifted, as the main bench lifts the submit limit.
        lifted = {"OUTLAST_SUBMIT_RATE_PER_S": "1000000", "OUTLAST_SUBMIT_BURST": "1000000"}
        lifted |= {"OUTLAST_MAX_STREAMS_PER_KEY": "1000000", "OUTLAST_MAX_STREAMS_PER_TOKEN": "1000000"}
        super().__init__(deps, env | lifted | {"OUTLAST_SECRET_KEY": SECRET})
        self.guard = AuthState(config, SECRET.encode(), may_run_open=False)
        self.api_key = ""  # for the load's submits and reads: `await side.key()` makes it

    async def keys(self, count: int) -> list[str]:
        ids = []
        for start in range(0, count, 1_000):
            jobs = [self._job() for _ in range(min(1_000, count - start))]
            await store.insert_jobs(self.deps.db, jobs)
            ids += [str(job.id) for job in jobs]
        return ids

    @staticmethod
    def _job() -> store.NewJob:
        return store.NewJob(
            id=uuid7(), tenant="default", type="sleep", input=b"{}", max_attempts=1, timeout_s=3600,
            retry_safe=True, callback_url=None, metadata=b"{}", ttl_s=3600,
        )  # fmt: skip

    def path(self, key: str) -> str:
        return f"/v1/jobs/{key}/events?token={self.guard.token('default', UUID(key))}"

    async def key(self) -> str:
        if not self.api_key:
            self.api_key = await keys.create(self.deps.db, "default", "bench-streams")
        return self.api_key

    async def start_events(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1_000):  # as a worker does: claimed, then their progress
            wanted = [(UUID(key), 0) for key in keys[start : start + 1_000]]
            await claim_many(self.deps.jobs, wanted, owner="bench", lease_s=3600)
        await self.deps.notifier.flush()

    async def publish_many(self, keys: list[str], marker: int, fraction: float) -> float:
        # What a worker's pulse sends each tick (worker/heartbeat.py): one statement for every attempt that
        # reported, then the doorbell naming them (the Notifier, up to 1,000 ids a message).
        progress = Progress(fraction, f"#{marker}#")
        await beat_many(self.deps.jobs, [(UUID(key), 1, [("progress", progress)]) for key in keys], lease_s=3600)
        published = time.monotonic()
        await self.deps.notifier.flush()
        return published


class Bare(Side):
    name, factory = "bare", "bench.streams.bare:create_app"

    def path(self, key: str) -> str:
        return f"/stream/{key}"

    async def publish_many(self, keys: list[str], marker: int, fraction: float) -> float:
        # A message per event, the event in it: what an app streaming from pub/sub alone publishes.
        published = time.monotonic()
        async with self.deps.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.publish("bare:events", f"{key} #{marker}#")
            await pipe.execute()
        return published


# -- the three measurements -------------------------------------------------------------------------


async def idle(side: Side, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    await side.reset()
    keys = await side.keys(settings.stream_jobs)
    paths = [side.path(keys[i % len(keys)]) for i in range(settings.streams)]
    async with Server(side.name, side.factory, side.env) as server:
        async with Clients(1) as warm:  # the first streams allocate what every later one reuses
            await warm.open(server.port, paths[:200])
        await asyncio.sleep(1.0)
        before = rss_kib(server.pid)
        async with Clients(settings.clients) as clients:
            started = time.monotonic()
            opened, failed = await clients.open(server.port, paths)
            open_s = time.monotonic() - started
            await asyncio.sleep(settings.hold_s)
            after = rss_kib(server.pid)
            await side.start_events(keys)
            for key in keys:
                await side.publish(key, 0, 0.5)
            found = await delivered_to_all(clients, range(1), opened, within=60)
            _, ended = await clients.report()
    result = {
        "opened": opened,
        "failed": failed,
        "open_s": round(open_s, 2),
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "rss_per_stream_kib": round((after - before) / max(opened, 1), 2),
        "alive_after_hold": len(found.get(0, ())),
        "ended_early": ended,
    }
    log(f"  idle   {side.name:<8} {result}")
    return result


async def fanout(side: Side, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    await side.reset()
    (key,) = await side.keys(1)
    async with Server(side.name, side.factory, side.env) as server, Clients(2) as clients:
        opened, failed = await clients.open(server.port, [side.path(key)] * settings.watchers)
        await side.start_events([key])
        await asyncio.sleep(1.0)
        cpu_before = cpu_s(server.pid)
        published = {}
        for marker in range(1, settings.fanout_events + 1):
            published[marker] = await side.publish(key, marker, marker / settings.fanout_events)
            await asyncio.sleep(settings.fanout_interval_s)
        markers = range(1, settings.fanout_events + 1)
        found = await delivered_to_all(clients, markers, opened, within=60)
        cpu_after = cpu_s(server.pid)
    latencies = sorted(t - published[m] for m in markers for t in found.get(m, ()))
    deliveries = len(latencies)
    result = {
        "watchers": opened,
        "failed": failed,
        "deliveries": deliveries,
        "missing": settings.fanout_events * opened - deliveries,
        "cpu_us_per_delivery": round((cpu_after - cpu_before) / max(deliveries, 1) * 1e6, 2),
        "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2) if latencies else None,
        "p100_ms": round(latencies[-1] * 1e3, 2) if latencies else None,
    }
    log(f"  fanout {side.name:<8} {result}")
    return result


async def running(side: Side, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """S5: RUNNING_STREAMS streams following RUNNING_JOBS running jobs, each job reporting every `report_s`, the
    reports written and published a tick at a time as a worker's pulse does (a job in one tick of every
    `report_s / tick_s`), for `running_s`; the web's CPU per delivery and every delivery's publish -> received."""
    await side.reset()
    keys = await side.keys(settings.running_jobs)
    await side.start_events(keys)
    groups = max(1, round(settings.report_s / settings.tick_s))
    followers = [0] * len(keys)
    paths = []
    for i in range(settings.running_streams):
        followers[i % len(keys)] += 1
        paths.append(side.path(keys[i % len(keys)]))
    ticks = round(settings.running_s / settings.tick_s)
    markers = range(1, ticks + 1)
    expected = {t: sum(followers[(t - 1) % groups :: groups]) for t in markers}
    async with Server(side.name, side.factory, side.env) as server, Clients(settings.clients) as clients:
        began = time.monotonic()
        opened, failed = await clients.open(server.port, paths)
        open_s = time.monotonic() - began
        await asyncio.sleep(1.0)
        cpu_before, started = cpu_s(server.pid), time.monotonic()
        published: dict[int, float] = {}
        late = 0.0  # how far the publisher fell behind its schedule, at worst
        for t in markers:
            wait = started + (t - 1) * settings.tick_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            late = max(late, -wait)
            group = keys[(t - 1) % groups :: groups]
            published[t] = await side.publish_many(group, t, min(1.0, t / ticks))
        publish_s = time.monotonic() - started

        async def all_delivered() -> bool:
            counted = await clients.counts()
            return all(counted.get(t, 0) >= expected[t] for t in markers)

        with contextlib.suppress(RuntimeError):  # a shortfall is reported, not raised
            await eventually(all_delivered, within=60, what="every stream got every report")
        cpu_after, window_s = cpu_s(server.pid), time.monotonic() - started
        found, ended = await clients.report()
    latencies = sorted(x - published[m] for m in markers for x in found.get(m, ()))
    deliveries = len(latencies)
    cpu = cpu_after - cpu_before

    def ms(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1e3, 2) if latencies else None

    result = {
        "jobs": len(keys),
        "streams": opened,
        "failed": failed,
        "open_s": round(open_s, 1),
        "deliveries": deliveries,
        "missing": sum(expected.values()) - deliveries,
        "ended_early": ended,
        "publish_s": round(publish_s, 2),
        "publisher_late_s": round(late, 3),
        "window_s": round(window_s, 2),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_delivery": round(cpu / max(deliveries, 1) * 1e6, 2),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "max_ms": ms(1.0),
    }
    log(f"  running {side.name:<7} {result}")
    return result


async def run_load(port: int, seconds: float, connections: int, api_key: str) -> dict[str, Any]:
    argv = [PYTHON, "-m", "bench.streams.load", str(port), str(seconds), str(connections), api_key]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    answer: dict[str, Any] = json.loads(out)
    return answer


async def load(side: Outlast, settings: Settings, first: str, log: Callable[[str], None]) -> dict[str, Any]:
    """ABBA (or BAAB): two slices of each arm, mirrored, so a drift of the machine during the round cancels."""
    await side.reset()
    keys = await side.keys(10)
    paths = [side.path(keys[i % len(keys)]) for i in range(settings.idle_under_load)]
    second = "with" if first == "none" else "none"
    done: dict[str, list[tuple[int, float, float]]] = {"none": [], "with": []}  # (requests, wall s, server CPU s)
    async with Server(side.name, side.factory, side.env) as server:
        api_key = await side.key()
        await run_load(server.port, 2.0, settings.load_connections, api_key)  # warm up
        for arm in (first, second, second, first):
            async with contextlib.AsyncExitStack() as stack:
                if arm == "with":
                    clients = await stack.enter_async_context(Clients(1))
                    await clients.open(server.port, paths)
                    await asyncio.sleep(1.0)
                cpu = cpu_s(server.pid)
                answer = await run_load(server.port, settings.load_s, settings.load_connections, api_key)
                done[arm].append((answer["requests"], answer["seconds"], cpu_s(server.pid) - cpu))
            if answer["errors"]:
                log(f"  load   {arm}: {answer['errors']} errors")

    def rate(arm: str, per: int) -> float:
        return sum(n for n, *_ in done[arm]) / sum(x[per] for x in done[arm])

    result = {
        "rps_none": round(rate("none", 1), 1),
        "rps_with_streams": round(rate("with", 1), 1),
        # requests per second of the web process's own CPU: what it can serve, whatever else the machine runs
        "rp_cpu_s_none": round(rate("none", 2), 1),
        "rp_cpu_s_with_streams": round(rate("with", 2), 1),
        "slices_rps": {arm: [round(n / wall, 1) for n, wall, _ in values] for arm, values in done.items()},
    }
    log(f"  load   outlast  {result}")
    return result


# -- the run ----------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


@contextlib.asynccontextmanager
async def services() -> AsyncIterator[Config]:
    from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey

    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "logs").mkdir(exist_ok=True)
    with (
        EmbeddedPostgres(DATA / "postgres", port=free_port()) as pg,
        EmbeddedValkey(DATA / "valkey", port=free_port()) as valkey,
    ):
        dsn = pg.dsn("outlast_bench_streams")
        await create_database(dsn)
        await migrate(dsn)
        yield Config(database_url=dsn, redis_url=valkey.url(0))


async def main(settings: Settings) -> dict[str, Any]:
    began = time.monotonic()
    raise_open_files(max(settings.streams, settings.running_streams) + 1_000)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    async with services() as config, connect(config) as deps:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLAST_")}
        env.update(DATABASE_URL=config.database_url, REDIS_URL=config.redis_url)
        outlast, bare = Outlast(deps, env, config), Bare(deps, env)
        runs: dict[str, list[dict[str, Any]]] = {"idle": [], "fanout": [], "load": [], "running": []}
        for round_ in range(settings.rounds):
            if time.monotonic() - began > DEADLINE_S:
                log(f"stopping after {round_} rounds: past {DEADLINE_S:.0f} s")
                break
            order = (outlast, bare) if round_ % 2 else (bare, outlast)
            log(f"round {round_ + 1} ({order[0].name} first)")
            for name, measure in (("idle", idle), ("fanout", fanout), ("running", running)):
                if name in settings.only:
                    runs[name].append({side.name: await measure(side, settings, log) for side in order})
            if "load" in settings.only:
                runs["load"].append(await load(outlast, settings, "with" if round_ % 2 else "none", log))
    ratios = {
        name: spread(values)
        for name, values in {
            "idle_rss_per_stream": [
                r["outlast"]["rss_per_stream_kib"] / r["bare"]["rss_per_stream_kib"] for r in runs["idle"]
            ],
            "fanout_cpu_per_delivery": [
                r["outlast"]["cpu_us_per_delivery"] / r["bare"]["cpu_us_per_delivery"] for r in runs["fanout"]
            ],
            "fanout_p100": [r["outlast"]["p100_ms"] / r["bare"]["p100_ms"] for r in runs["fanout"]],
            "load_rps_with_streams": [r["rps_with_streams"] / r["rps_none"] for r in runs["load"]],
            "load_rps_per_cpu_with_streams": [r["rp_cpu_s_with_streams"] / r["rp_cpu_s_none"] for r in runs["load"]],
            "running_cpu_per_delivery": [
                r["outlast"]["cpu_us_per_delivery"] / r["bare"]["cpu_us_per_delivery"] for r in runs["running"]
            ],
        }.items()
        if values
    }
    dropped = sum(r[s]["opened"] - r[s]["alive_after_hold"] + r[s]["failed"] for r in runs["idle"] for s in r)
    limits = {
        "idle_rss_per_stream": ("<=", 1.5),
        "fanout_cpu_per_delivery": ("<=", 2.0),
        "fanout_p100": ("<=", 2.0),
        "load_rps_with_streams": (">=", 0.9),
        "load_rps_per_cpu_with_streams": (">=", 0.9),
        "running_cpu_per_delivery": ("<=", 1.3),
    }
    log("\nratios (min / median / max over the rounds)")
    for name, value in ratios.items():
        op, bound = limits[name]
        ok = value["max"] <= bound if op == "<=" else value["min"] >= bound
        log(f"  {name:<30} {value['min']:>7} {value['median']:>7} {value['max']:>7}   target {op} {bound}  {ok=}")
    log(f"  idle streams dropped or failed: {dropped}")
    for side in ("outlast", "bare"):
        if p99s := [r[side]["p99_ms"] for r in runs["running"] if r[side]["p99_ms"] is not None]:
            missing = sum(r[side]["missing"] for r in runs["running"])
            verdict = f"goal <= {RUNNING_P99_MS:.0f}  ok={max(p99s) <= RUNNING_P99_MS}" if side == "outlast" else ""
            log(f"  running p99 ms, {side:<8} {min(p99s):>7} {statistics.median(p99s):>7} {max(p99s):>7}   {verdict}")
            log(f"  running deliveries missing, {side}: {missing}")
    return {
        "settings": asdict(settings),
        "runs": runs,
        "ratios": ratios,
        "dropped": dropped,
        "seconds": round(time.monotonic() - began, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=Settings.streams)
    parser.add_argument("--watchers", type=int, default=Settings.watchers)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--running-jobs", type=int, default=Settings.running_jobs)
    parser.add_argument("--running-streams", type=int, default=Settings.running_streams)
    parser.add_argument("--running-s", type=float, default=Settings.running_s)
    parser.add_argument("--only", nargs="+", choices=Settings.only, default=Settings.only)
    args = parser.parse_args()
    chosen = Settings(
        streams=args.streams, watchers=args.watchers, running_jobs=args.running_jobs,
        running_streams=args.running_streams, running_s=args.running_s, rounds=args.rounds, only=tuple(args.only),
    )  # fmt: skip
    report = asyncio.run(main(chosen))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"streams-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{report['seconds']} s; results in {path.relative_to(ROOT)}")
