"""The two sides of bench/streams (python -m bench.streams): Outlast's web process and the bare sse-starlette app
(bare.py), each a fresh uvicorn process per round, and the client processes that hold their streams; the run's
settings, and the /proc readings every measurement takes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from uuid_utils.compat import uuid7

from bench.procs import until
from server.auth import AuthState
from worker import Config, Deps, Progress, keys, store
from worker.claim import claim_many
from worker.heartbeat import beat_many

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".outlast" / "bench-streams"
PYTHON = sys.executable
SECRET = secrets.token_urlsafe(32)  # Outlast's OUTLAST_SECRET_KEY for this run: it signs the events links
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

            await until(up, within=60, what=f"{self.name} answers /healthz")
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
        await until(check, within=within, what="every stream got every event")
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
