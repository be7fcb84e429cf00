"""What both processes speak: statuses, the state machine, the Job resource, job types and their context."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing as mp
import os
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, get_args
from uuid import UUID

import msgspec

if TYPE_CHECKING:
    from worker.blobs import File, Source, Upload
    from worker.egress import Http
    from worker.job_types.report import DailyJobs
    from worker.vectors.store import Vectors

T = TypeVar("T")

# The six words of the API, unchanged in SQL, Python, JSON and metric labels.
Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
TERMINAL: Final[frozenset[Status]] = frozenset({"succeeded", "failed", "cancelled", "expired"})
LIVE: Final[frozenset[Status]] = frozenset({"queued", "running"})
# The whole state machine, as data: terminal states have no way out.
NEXT: Final[Mapping[Status, frozenset[Status]]] = {
    "queued": frozenset({"running", "cancelled", "expired"}),
    "running": frozenset({"queued", "succeeded", "failed", "cancelled", "expired"}),
}


LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: Final[frozenset[str]] = frozenset(get_args(LogLevel))


def allowed_from(to: Status) -> list[Status]:
    """The states from which a job may move to `to`."""
    return sorted(status for status, nxt in NEXT.items() if to in nxt)


class Progress(msgspec.Struct, frozen=True, gc=False):  # a float and a str: never in a cycle, so never tracked
    fraction: float = 0.0
    message: str | None = None


class Error(msgspec.Struct, frozen=True):
    type: str
    message: str
    retryable: bool = False


CANCELLED: Final = Error("cancelled", "cancelled on request", False)  # a cancelled job's error


class Links(msgspec.Struct, frozen=True):
    self: str
    events: str
    result: str


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """The Job resource of API.md."""

    id: UUID
    type: str
    status: Status
    done: bool
    input: msgspec.Raw
    progress: Progress
    attempt: int
    max_attempts: int
    timeout_s: int
    result: msgspec.Raw | None
    result_size: int | None  # a result kept in the blob store (`result` is then null): GET …/result streams it
    error: Error | None
    callback_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime
    retry_of: UUID | None  # POST /v1/jobs/{id}/retry made this job from that one
    run_at: datetime | None  # not started before then, as asked on submit
    priority: int
    concurrency_key: str | None
    links: Links
    workflow_id: UUID | None  # a workflow step's job: its workflow and step (docs/workflows.md)
    step: str | None
    parent_id: UUID | None  # spawned by that job's code (ctx.spawn)


class JobError(Exception):
    """The job failed; `retryable` says whether another attempt may succeed."""

    type: str = "job_error"
    retryable: bool = False

    def __init__(self, message: str, *, type: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        if type is not None:
            self.type = type
        if retryable is not None:
            self.retryable = retryable


class RetryableError(JobError):
    """A passing failure (a flaky network, a busy upstream): another attempt may succeed."""

    type = "retryable_error"
    retryable = True


_pool: ProcessPoolExecutor | None = None


async def in_process_pool(fn: Callable[..., T], *args: Any) -> T:
    """Run CPU-heavy pure-Python work in a process pool, so the event loop keeps heartbeating meanwhile.

    `asyncio.to_thread` is not enough: the GIL would still starve the loop. `fn` and its arguments must pickle.
    """
    global _pool
    if _pool is None:
        # forkserver, not fork: forking a process that runs threads and an event loop is unsafe.
        _pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=mp.get_context("forkserver"))
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


def shut_process_pool() -> None:
    """Stop the pool's processes (the worker's shutdown): they would otherwise outlive a worker that exits."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


class Child(msgspec.Struct, frozen=True):
    """A spawned child as its parent sees it once it waited (ctx.children): how it ended, and with what."""

    id: UUID
    type: str
    status: Status
    result: Any
    error: Error | None


class Waiting:
    """What `ctx.wait_for_children()` returns: the job's code ends its run there, and runs again once they ended."""

    __slots__ = ()


WAITING: Final = Waiting()


async def _no_spawn(type: str, input: Any, key: str, metadata: Mapping[str, Any] | None) -> UUID:
    raise RuntimeError("this Context was made without a worker: it can't spawn")


async def _no_output(name: str, data: Source, content_type: str) -> File:
    raise RuntimeError("this Context was made without a worker: it can't write files")


async def _no_open(upload_id: str) -> Upload:
    raise RuntimeError("this Context was made without a worker: it can't open uploads")


async def _no_job_stats(since: date, until: date) -> list[DailyJobs]:
    raise RuntimeError("this Context was made without a worker: it can't read the tenant's jobs")


def _no_vectors() -> Vectors:
    from worker.vectors.store import Vectors  # here: worker.vectors imports this module

    return Vectors(None, "default")


def _no_http() -> Http:
    from worker.egress import unattached  # here: worker.egress imports this module

    return unattached()


@dataclass(frozen=True, slots=True)  # one per running attempt: no __dict__ each
class Context:
    """What a job's coroutine gets besides its input."""

    job_id: UUID
    attempt: int  # 1 for the first attempt
    max_attempts: int
    _report: Callable[[Progress], None] = field(repr=False)
    _log: Callable[[LogLevel, str], None] = field(default=lambda level, message: None, repr=False)
    # A workflow step's job: the result of each step it came after, by name (a map step's: the list of its results,
    # in item order); in a map step's job, its map source's name gives its own item instead. Empty otherwise.
    upstream: Mapping[str, Any] = field(default_factory=dict)
    # The job's spawned children by key, once it waited for them (worker/spawn.py); empty on a run that did not.
    children: Mapping[str, Child] = field(default_factory=dict)
    _spawn: Callable[[str, Any, str, Mapping[str, Any] | None], Awaitable[UUID]] = field(default=_no_spawn, repr=False)
    # The job's own HTTP requests, through the SSRF guard, with a circuit breaker per host (worker/egress.py).
    http: Http = field(default_factory=_no_http, repr=False)
    # The tenant's vector collections in PostgreSQL with pgvector (worker/vectors/store.py).
    vectors: Vectors = field(default_factory=_no_vectors, repr=False)
    _output: Callable[[str, Source, str], Awaitable[File]] = field(default=_no_output, repr=False)
    _open: Callable[[str], Awaitable[Upload]] = field(default=_no_open, repr=False)
    _job_stats: Callable[[date, date], Awaitable[list[DailyJobs]]] = field(default=_no_job_stats, repr=False)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress in [0, 1]. Cheap: only the latest value is written, a few times a second at most."""
        self._report(Progress(min(1.0, max(0.0, float(fraction))), message))
        await asyncio.sleep(0)  # a yield point, so a tight loop that reports progress stays cancellable

    async def log(self, level: LogLevel, message: str) -> None:
        """A line for the job's event log (`log` events, shown by `outlast submit --wait`); level is debug, info,
        warning or error. Buffered: lines are written in batches, long ones are cut and a flood is thinned."""
        self._log(level, str(message))
        await asyncio.sleep(0)

    async def spawn(self, type: str, input: Any, *, key: str, metadata: Mapping[str, Any] | None = None) -> UUID:
        """Start a child job of `type` in this job's tenant; its id. The same `key` on a later attempt (or run)
        of this job returns the same child, never a second one. `input` is checked against the type's schema."""
        return await self._spawn(type, input, key, metadata)

    async def output(self, name: str, data: Source, *, content_type: str = "application/octet-stream") -> File:
        """Keep a file this attempt made (bytes, a str, or an iterable or async iterable of bytes) in the blob store
        under `name`; its name, size, content type and link (`GET /v1/jobs/{id}/result?file=name`), which the job's
        result may list. Written again under the same name, the later file is the one served."""
        return await self._output(name, data, content_type)

    async def open(self, upload_id: str) -> Upload:
        """An upload of this job's tenant (POST /v1/uploads) by its id, to read whole or a chunk at a time; an id
        that names none of the tenant's uploads fails the job with error type `unknown_upload`."""
        return await self._open(upload_id)

    async def job_stats(self, since: date, until: date) -> list[DailyJobs]:
        """The tenant's jobs per type and UTC day from `since` to `until` (both included, a year at most): how many,
        how they stand, their mean run time (the `report` job type's table)."""
        return await self._job_stats(since, until)

    def wait_for_children(self) -> Waiting:
        """`return ctx.wait_for_children()`: this run ends, holding no worker slot, and the job's code runs again
        once every child it spawned has ended, with their outcomes in `ctx.children` (docs/workflows.md)."""
        return WAITING


@dataclass(frozen=True)
class Rate:
    """At most `count` starts every `per_s` seconds, across every worker (a token bucket: bursts up to `count`)."""

    count: int
    per_s: float


@dataclass(frozen=True)
class JobType:
    """A registered kind of job: a msgspec Input type and one function: a coroutine, run on the worker's loop, or a
    plain `def` taking a SyncContext, run in a thread or (`executor="process"`) a process (worker/executors.py)."""

    name: str
    input: type[msgspec.Struct]
    run: Callable[[Any, Any], Any]  # (input, Context) -> Awaitable, or (input, SyncContext) -> result
    retry_safe: bool = True  # may run again after a crash: at-least-once is fine for it
    timeout_s: int = 3600
    max_attempts: int | None = None  # None: the deployment's default
    description: str = ""
    # At most this many jobs of one `concurrency_key` run at once, across every worker. None: the type takes no key.
    concurrency: int | None = None
    rate: Rate | None = None  # starts beyond it wait queued (worker/claim.py); None: as fast as workers take them
    executor: Literal["thread", "process"] = "thread"  # where a plain `def` runs; a coroutine runs on the loop
    decoder: msgspec.json.Decoder[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"job type {self.name!r}: concurrency must be at least 1")
        if self.rate is not None and (self.rate.count < 1 or self.rate.per_s <= 0):
            raise ValueError(f"job type {self.name!r}: a rate needs a count of at least 1 per a positive per_s")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"job type {self.name!r}: executor must be 'thread' or 'process'")
        if self.executor == "process" and not self.plain:
            raise ValueError(f"job type {self.name!r}: executor='process' runs a plain def, not a coroutine")
        object.__setattr__(self, "decoder", msgspec.json.Decoder(self.input))

    @property
    def plain(self) -> bool:
        """A plain function, run off the loop, rather than a coroutine."""
        return not inspect.iscoroutinefunction(self.run)
