"""Job types only the chaos tests use, registered as a user's package is (OUTLAST_JOB_MODULES=...,tests.chaos.jobs).

Every attempt records itself in the `chaos_attempts` table (pid, wall-clock start and end, how it ended) through
a connection of its own, so a test can prove from outside the engine that no two attempts of one job ever ran
at the same time, and count how often a poison pill really ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
import msgspec

from worker import Context, JobType, RetryableError, Waiting

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS chaos_attempts (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL,
    attempt     integer NOT NULL,
    pid         integer NOT NULL,
    started_at  double precision NOT NULL,  -- time.time() when the job's code began
    ended_at    double precision,           -- when its code ended; NULL: the process died first
    outcome     text                        -- returned | raised | cancelled
)
"""

_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _db() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4, timeout=5)
    return _pool


async def _begin(ctx: Context) -> int:
    started = time.time()
    row_id: int = await (await _db()).fetchval(
        "INSERT INTO chaos_attempts (job_id, attempt, pid, started_at) VALUES ($1, $2, $3, $4) RETURNING id",
        ctx.job_id,
        ctx.attempt,
        os.getpid(),
        started,
    )
    return row_id


async def _end(row_id: int, outcome: str) -> None:
    ended = time.time()
    await asyncio.wait_for(
        (await _db()).execute(
            "UPDATE chaos_attempts SET ended_at = $2, outcome = $3 WHERE id = $1", row_id, ended, outcome
        ),
        5,
    )


@contextlib.asynccontextmanager
async def recorded(ctx: Context) -> AsyncIterator[None]:
    """Record this attempt's start now and its end however the body ends (a SIGKILL leaves ended_at NULL)."""
    row_id = await _begin(ctx)
    try:
        yield
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await _end(row_id, "cancelled")
        raise
    except BaseException:
        await _end(row_id, "raised")
        raise
    await _end(row_id, "returned")


class Sleep(msgspec.Struct, forbid_unknown_fields=True):
    seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    later_seconds: Annotated[float, msgspec.Meta(ge=0)] | None = None  # attempts after the first sleep this long


class Ran(msgspec.Struct):
    attempt: int
    pid: int


def _seconds(input: Sleep, ctx: Context) -> float:
    return input.seconds if ctx.attempt == 1 or input.later_seconds is None else input.later_seconds


async def chaos_sleep(input: Sleep, ctx: Context) -> Ran:
    async with recorded(ctx):
        await asyncio.sleep(_seconds(input, ctx))
    return Ran(ctx.attempt, os.getpid())


async def chaos_flaky(input: Sleep, ctx: Context) -> Ran:
    """Sleeps, then fails its first attempt with a retryable error."""
    async with recorded(ctx):
        await asyncio.sleep(_seconds(input, ctx))
        if ctx.attempt == 1:
            raise RetryableError("the first attempt always fails")
    return Ran(ctx.attempt, os.getpid())


class Nothing(msgspec.Struct, forbid_unknown_fields=True):
    pass


async def chaos_suicide(input: Nothing, ctx: Context) -> None:
    """A poison pill: SIGKILLs the worker process running it."""
    await _begin(ctx)
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(60)  # not reached


async def chaos_exit(input: Nothing, ctx: Context) -> None:
    """A poison pill: ends the worker process at once with status 1, running no cleanup."""
    await _begin(ctx)
    os._exit(1)


class Items(msgspec.Struct, forbid_unknown_fields=True):
    n: int


async def chaos_items(input: Items, ctx: Context) -> list[int]:
    async with recorded(ctx):
        return list(range(input.n))


class Item(msgspec.Struct, forbid_unknown_fields=True):
    of: str  # the map source: ctx.upstream[of] is this job's item
    seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0  # at most: item i sleeps (i % 10 + 1) / 10 of it


async def chaos_item(input: Item, ctx: Context) -> int:
    item = int(ctx.upstream[input.of])
    async with recorded(ctx):
        await asyncio.sleep(input.seconds * (item % 10 + 1) / 10)
    return item * 2


class Join(msgspec.Struct, forbid_unknown_fields=True):
    of: str


class Joined(msgspec.Struct):
    n: int
    total: int
    in_order: bool


async def chaos_join(input: Join, ctx: Context) -> Joined:
    results = [int(r) for r in ctx.upstream[input.of]]
    async with recorded(ctx):
        return Joined(len(results), sum(results), results == sorted(results))


class Spawn(msgspec.Struct, forbid_unknown_fields=True):
    n: int
    seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.5  # each child sleeps this long


class Spawned(msgspec.Struct):
    n: int
    statuses: list[str]


async def chaos_spawner(input: Spawn, ctx: Context) -> Spawned | Waiting:
    """Spawns n chaos_sleep children and waits for them; its first attempt SIGKILLs its worker right after spawning."""
    if ctx.children:
        async with recorded(ctx):
            return Spawned(len(ctx.children), sorted({c.status for c in ctx.children.values()}))
    row_id = await _begin(ctx)
    for i in range(input.n):
        await ctx.spawn("chaos_sleep", {"seconds": input.seconds}, key=f"child-{i}")
    if ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    await _end(row_id, "returned")
    return ctx.wait_for_children()


JOB_TYPES = (
    JobType("chaos_spawner", Spawn, chaos_spawner, timeout_s=60, description="Spawn, die once, then wait for them."),
    JobType("chaos_items", Items, chaos_items, timeout_s=60, description="A list of n items, recording the attempt."),
    JobType("chaos_item", Item, chaos_item, timeout_s=600, description="One mapped item: sleep, then twice it."),
    JobType("chaos_join", Join, chaos_join, timeout_s=60, description="A fan-in: how many results, their sum."),
    JobType("chaos_sleep", Sleep, chaos_sleep, timeout_s=600, description="Sleep, recording the attempt."),
    JobType(
        "chaos_once", Sleep, chaos_sleep, retry_safe=False, timeout_s=600, description="chaos_sleep, not retry-safe."
    ),
    JobType("chaos_flaky", Sleep, chaos_flaky, timeout_s=600, description="Sleep, then fail the first attempt."),
    JobType("chaos_keyed", Sleep, chaos_sleep, timeout_s=600, concurrency=2, description="chaos_sleep, 2 per key."),
    JobType("chaos_suicide", Nothing, chaos_suicide, timeout_s=60, description="SIGKILL the worker."),
    JobType("chaos_exit", Nothing, chaos_exit, timeout_s=60, description="os._exit(1) the worker."),
)
