"""Plain functions as job types: a `def run(input, ctx)` runs in a thread (blocking I/O, legacy code), or with
`executor="process"` in a process of its own (CPU-bound work), while the event loop keeps the heartbeat going.

Either gets a `SyncContext`, whose `progress` and `log` are plain calls. A thread can't be stopped from outside:
once its attempt ended (cancel, timeout) its next `ctx.progress` or `ctx.log` raises `Stopped`, and whatever it
returns is dropped; write long loops to report progress. A process can: on cancel or timeout it is terminated, and
killed if it has not gone within `TERMINATE_GRACE_S`. Processes come from a forkserver (forking a process that runs
threads and an event loop is unsafe), at most one per core at once per worker; a job waiting for one is running
and heartbeating meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from worker.job import LOG_LEVELS, Context, JobError, JobType, LogLevel, Progress

TERMINATE_GRACE_S = 2.0
_encode = msgspec.json.Encoder().encode


class Stopped(Exception):
    """The attempt this function runs for is over (cancelled, timed out): stop working."""


@dataclass
class SyncContext:
    """What a plain function gets besides its input: `ctx.progress` and `ctx.log` without `await`."""

    job_id: Any
    attempt: int
    max_attempts: int
    upstream: Mapping[str, Any] = field(default_factory=dict)
    _send: Callable[[tuple[Any, ...]], None] = field(default=lambda message: None, repr=False)
    _over: threading.Event = field(default_factory=threading.Event, repr=False)
    _output: Callable[[str, Any, str], Any] | None = field(default=None, repr=False)  # in a thread only

    def progress(self, fraction: float, message: str | None = None) -> None:
        self._check()
        self._send(("progress", min(1.0, max(0.0, float(fraction))), message))

    def log(self, level: LogLevel, message: str) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(sorted(LOG_LEVELS))}, not {level!r}")
        self._check()
        self._send(("log", level, str(message)))

    def output(self, name: str, data: bytes | str, *, content_type: str = "application/octet-stream") -> Any:
        """`ctx.output` from a thread: the file is stored by the worker's loop, and this waits for it. Not in a
        process of its own (`executor="process"`), which has no connection to store it with: return the bytes."""
        self._check()
        if self._output is None:
            raise RuntimeError("ctx.output is not available to a job that runs in a process of its own")
        return self._output(name, data, content_type)

    @property
    def stopped(self) -> bool:
        """True once the attempt is over: a long loop may check it between steps."""
        return self._over.is_set()

    def _check(self) -> None:
        if self._over.is_set():
            raise Stopped(f"attempt {self.attempt} of job {self.job_id} is over")

    def __getstate__(self) -> dict[str, Any]:  # to a process: no loop, no event; its own _send is set there
        return {"job_id": self.job_id, "attempt": self.attempt, "max_attempts": self.max_attempts,
                "upstream": dict(self.upstream)}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


class Executors:
    """A worker's threads for plain functions (one per slot, so a blocking job never waits for another's thread)
    and its bound on processes (one per core)."""

    def __init__(self, threads: int) -> None:
        self.threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="outlast-job")
        self.processes = asyncio.Semaphore(os.cpu_count() or 1)

    def shutdown(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)

    def call(self, job_type: JobType, value: Any, ctx: Context) -> Awaitable[Any]:
        """The job's run as an awaitable: its coroutine, or its plain function where its type says."""
        if not job_type.plain:
            awaitable: Awaitable[Any] = job_type.run(value, ctx)
            return awaitable
        return self._run(job_type.run, job_type.executor == "process", value, ctx)

    async def _run(self, fn: Callable[[Any, SyncContext], Any], in_process: bool, value: Any, ctx: Context) -> Any:
        loop = asyncio.get_running_loop()
        sync = SyncContext(ctx.job_id, ctx.attempt, ctx.max_attempts, ctx.upstream)

        def relay(message: tuple[Any, ...]) -> None:
            if message[0] == "progress":
                ctx._report(Progress(message[1], message[2]))
            elif message[0] == "log":
                ctx._log(message[1], message[2])

        if not in_process:

            def send(message: tuple[Any, ...]) -> None:
                loop.call_soon_threadsafe(relay, message)

            sync._send = send
            sync._output = lambda name, data, kind: asyncio.run_coroutine_threadsafe(
                ctx.output(name, data, content_type=kind), loop
            ).result()
            try:
                return await asyncio.wrap_future(self.threads.submit(fn, value, sync))
            finally:
                sync._over.set()
        async with self.processes:
            return await _in_process(fn, value, sync, relay)


async def _in_process(
    fn: Callable[[Any, SyncContext], Any], value: Any, sync: SyncContext, relay: Callable[[tuple[Any, ...]], None]
) -> Any:
    loop = asyncio.get_running_loop()
    ours, theirs = mp.get_context("forkserver").Pipe(duplex=False)
    process = mp.get_context("forkserver").Process(target=_child, args=(fn, value, sync, theirs), daemon=True)
    process.start()
    theirs.close()
    ended: asyncio.Future[tuple[Any, ...]] = loop.create_future()

    def readable() -> None:
        try:
            message = ours.recv()
        except (EOFError, OSError):
            loop.remove_reader(ours.fileno())
            if not ended.done():
                ended.set_result(("died",))
            return
        if message[0] in ("result", "error"):
            loop.remove_reader(ours.fileno())
            if not ended.done():
                ended.set_result(message)
        else:
            relay(message)

    loop.add_reader(ours.fileno(), readable)
    try:
        outcome = await ended
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(ours.fileno())
        ours.close()
        await _stop(process)
    if outcome[0] == "result":
        return msgspec.Raw(outcome[1])
    if outcome[0] == "error":
        raise JobError(outcome[2], type=outcome[1], retryable=outcome[3])
    raise JobError(f"the job's process died (exit code {process.exitcode})", type="process_died", retryable=True)


async def _stop(process: Any) -> None:
    """Terminate the process unless it has gone, then kill it if it lingers; reap it either way."""
    if process.is_alive():
        process.terminate()
    for _ in range(int(TERMINATE_GRACE_S / 0.05)):
        if not process.is_alive():
            break
        await asyncio.sleep(0.05)
    else:
        process.kill()
    await asyncio.to_thread(process.join, 5)


def _child(fn: Callable[[Any, SyncContext], Any], value: Any, sync: SyncContext, conn: Connection) -> None:
    """The job's process: run `fn`, sending its progress and log lines, then its result or error."""
    sync._send = conn.send
    try:
        result = fn(value, sync)
        try:
            encoded = _encode(result)
        except Exception as exc:  # as the loop's path says of it: no later attempt would do better
            conn.send(("error", "invalid_result", f"the result can't be encoded as JSON: {exc}", False))
            return
        conn.send(("result", encoded))
    except JobError as exc:
        conn.send(("error", exc.type, str(exc) or type(exc).__name__, exc.retryable))
    except Exception as exc:  # whatever it raised is the job's error, as on the loop
        conn.send(("error", type(exc).__name__, str(exc) or type(exc).__name__, True))
    finally:
        conn.close()
