"""The processes a run starts: web servers, workers and load generators, each stopped before the run ends.

Each runs in its own session, so a Ctrl-C in the terminal reaches only the bench, which then stops them in
order; atexit kills whatever an unexpected exit left behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.load import Connection
from bench.services import ROOT, free_port

# The same loop, parser and logging on both sides of every HTTP comparison: Outlast's web as the Procfile starts it
# (`python -m server`: uvicorn on uvloop with server/protocol.py's httptools protocol), a baseline under plain uvicorn
# with these flags. No access log: it would cost both sides the same per request, and that shared cost would only
# squeeze the ratio toward 1.
UVICORN_FLAGS = ("--loop", "uvloop", "--http", "httptools", "--no-access-log")
OUTLAST_WEB = ("-m", "server", "--host", "127.0.0.1", "--no-access-log")
READY_S = 60.0
STOP_S = 30.0  # after SIGTERM; then SIGKILL
LOAD_S = 600.0  # a load process that runs longer is stuck
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


async def until(check: Callable[[], Awaitable[bool]], *, within: float, what: str, every_s: float = 0.2) -> None:
    """Poll `check` every `every_s` until it is true; past `within` seconds, stop the bench: `what` did not happen."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(every_s)


class Fleet:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        atexit.register(self.kill_all)

    async def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        if name in self._procs:
            raise RuntimeError(f"{name} is already running")
        with (self.logs / f"{name}.log").open("ab") as log:
            self._procs[name] = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip

    async def outlast(self, name: str, env: dict[str, str]) -> str:
        """Outlast's web on a free port, started as the Procfile starts it; its URL once it answers /healthz."""
        port = free_port()
        await self.start(name, [sys.executable, *OUTLAST_WEB], {**env, "PORT": str(port)})
        return await self._answering(name, port)

    async def web(self, name: str, app: str, env: dict[str, str]) -> str:
        """uvicorn --factory `app` (a baseline) on a free port; its URL once it answers /healthz."""
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", app, "--host", "127.0.0.1", "--port", str(port)]
        await self.start(name, [*argv, *UVICORN_FLAGS], env)
        return await self._answering(name, port)

    async def _answering(self, name: str, port: int) -> str:
        await self._until(name, lambda: _answers(port))
        return f"http://127.0.0.1:{port}"

    async def worker(self, name: str, settings: str, env: dict[str, str], redis_url: str, queue: str) -> None:
        """`arq settings`; back once it has polled its queue (its health-check key is there)."""
        # A pattern, since a deployment may suffix the key with its instance name.
        pattern = f"{queue}:health-check*"
        redis = Redis.from_url(redis_url)
        try:
            if stale := [key async for key in redis.scan_iter(match=pattern)]:
                await redis.delete(*stale)  # an earlier worker's key must not pass for this one's
            await self.start(name, [sys.executable, "-m", "arq", settings], env)
            await self._until(name, lambda: _exists(redis, pattern))
        finally:
            await redis.aclose()

    async def process(
        self, name: str, argv: list[str], env: dict[str, str], ready: Callable[[], Awaitable[bool]]
    ) -> None:
        """Any other long-running process (say a Celery worker); back once `ready()` says so."""
        await self.start(name, argv, env)
        await self._until(name, ready)

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    async def _until(self, name: str, ready: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + READY_S
        while not await ready():
            proc = self._procs[name]
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.logs / (name + '.log')}:\n{self.tail(name)}")
            await asyncio.sleep(0.05)

    def cpu_s(self, name: str) -> float:
        """CPU seconds (user + system) the process and its live descendants (a prefork pool) have used so far."""
        return sum(_cpu_s(pid) for pid in _tree(self._procs[name].pid))

    def tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / f"{name}.log").read_bytes()[-2000:].decode(errors="replace")
        return ""

    async def stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def stop_all(self) -> None:
        for name in list(self._procs):
            await self.stop(name)

    def kill_all(self) -> None:
        """The last resort, from atexit: no waiting, no event loop."""
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self._procs.clear()


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 on (the command name, which may hold spaces, cut off)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _cpu_s(pid: int) -> float:
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0  # ended meanwhile
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def tree_cpu_s(root: int) -> float:
    """CPU seconds of any process by its pid, with its live descendants' and those of the children it has reaped
    (`cutime`/`cstime`): for a server that forks a process per connection (PostgreSQL's postmaster) a backend that
    ended still counts."""
    try:
        fields = _stat(root)
    except OSError:
        return 0.0
    reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS  # cutime, cstime: fields 16 and 17 of stat
    return reaped + sum(_cpu_s(pid) for pid in _tree(root))


def _tree(root: int) -> list[int]:
    """`root` and every live process descended from it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])  # ppid: field 4
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree.extend(frontier)
    return tree


async def _answers(port: int) -> bool:
    try:
        conn = await Connection.open("127.0.0.1", port)
    except OSError:
        return False
    try:
        return await conn.request(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == 200
    except OSError:
        return False
    finally:
        conn.close()


async def _exists(redis: Redis, pattern: str) -> bool:
    return any([key async for key in redis.scan_iter(match=pattern)])


async def load(*args: str) -> dict[str, Any]:
    """Run `python -m bench.load args…` to the end; the figures it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.load", *args, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), LOAD_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode:
        raise RuntimeError(f"bench.load {args[0]} exited with {proc.returncode}:\n{err.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result
