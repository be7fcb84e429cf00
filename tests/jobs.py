"""Job types only the tests use, registered the way a user's package is: OUTLAST_JOB_MODULES=tests.jobs."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Literal

import msgspec

from worker import Context, JobError, JobType, Rate, RetryableError, SyncContext, Waiting, in_process_pool


class Nothing(msgspec.Struct, forbid_unknown_fields=True):
    pass


async def explode(input: Nothing, ctx: Context) -> None:
    raise ZeroDivisionError("an unexpected bug in the job")


async def refuse(input: Nothing, ctx: Context) -> None:
    raise JobError("the input can never work", type="bad_input")


async def unencodable(input: Nothing, ctx: Context) -> object:
    return object()


class Unstorable(msgspec.Struct, forbid_unknown_fields=True):
    where: Literal["result", "error", "progress", "log", "long_error"]
    char: Literal["nul", "surrogate"] = "nul"


async def unstorable(input: Unstorable, ctx: Context) -> str | None:
    """Puts a character PostgreSQL can't store where `where` says: a NUL (no text or jsonb holds one), or a lone
    surrogate (as bytes decoded with surrogateescape leave: no UTF-8 at all)."""
    if input.where == "long_error":
        raise JobError("x" * 1_000_000)
    bad = "\x00" if input.char == "nul" else "\udcff"
    text = f"before{bad}after"
    if input.where == "log":
        await ctx.log("info", text)
    elif input.where == "progress":
        await ctx.progress(0.5, text)
    elif input.where == "error":
        raise JobError(text, type=f"bad{bad}type")
    return text if input.where == "result" else None


class Digits(msgspec.Struct, forbid_unknown_fields=True):
    digits: int


async def big_int(input: Digits, ctx: Context) -> int:
    """An integer Python refuses to turn into text past 4,300 digits: msgspec's encoder raises ValueError."""
    return 10 ** (input.digits - 1)


class Text(msgspec.Struct, forbid_unknown_fields=True):
    json: str


async def raw_result(input: Text, ctx: Context) -> msgspec.Raw:
    """A result passed through as JSON text the encoder doesn't look at: PostgreSQL may still refuse it."""
    return msgspec.Raw(input.json.encode())


async def pool_pid(input: Nothing, ctx: Context) -> int:
    """The pid of the process in_process_pool ran its function in."""
    return await in_process_pool(os.getpid)


async def event_loop(input: Nothing, ctx: Context) -> str:
    return type(asyncio.get_running_loop()).__module__


class Seconds(msgspec.Struct, forbid_unknown_fields=True):
    seconds: float = 60.0


async def sleep_once(input: Seconds, ctx: Context) -> float:
    await asyncio.sleep(input.seconds)
    return input.seconds


async def block_first(input: Seconds, ctx: Context) -> int:
    """Blocks the event loop on its first attempt: no heartbeat can run meanwhile."""
    if ctx.attempt == 1:
        time.sleep(input.seconds)  # noqa: ASYNC251 - blocking the loop is the point
    return ctx.attempt


class Lines(msgspec.Struct, forbid_unknown_fields=True):
    lines: list[tuple[str, str]]  # (level, message)


async def chatty(input: Lines, ctx: Context) -> int:
    for level, message in input.lines:
        await ctx.log(level, message)  # type: ignore[arg-type]  # a bad level is the job's own bug
    return len(input.lines)


class Count(msgspec.Struct, forbid_unknown_fields=True):
    n: int


async def count_up(input: Count, ctx: Context) -> list[int]:
    return list(range(input.n))


class Of(msgspec.Struct, forbid_unknown_fields=True):
    of: str  # the upstream step it reads
    bad: int | None = None  # this item fails for good


REPAIRED: set[int] = set()  # bad items that no longer fail: what a fix deployed between a failure and its retry does


async def square_item(input: Of, ctx: Context) -> int:
    item = ctx.upstream[input.of]
    if item == input.bad and item not in REPAIRED:
        raise JobError(f"item {item} is bad", type="bad_item")
    return int(item) ** 2


async def upstream(input: Nothing, ctx: Context) -> dict[str, object]:
    return dict(ctx.upstream)


class FanOut(msgspec.Struct, forbid_unknown_fields=True):
    n: int
    child_type: str = "square_sum"
    child_input: dict[str, Any] | None = None  # None: {"data": [i]} for child i
    fail_first_attempt: bool = False  # raise after spawning, on attempt 1: the retry spawns again


async def fan_out(input: FanOut, ctx: Context) -> dict[str, Any] | Waiting:
    """Spawn n children, wait for them without holding a slot, and report what came back."""
    if ctx.children:
        return {k: {"status": c.status, "result": c.result} for k, c in ctx.children.items()}
    for i in range(input.n):
        child_input = {"data": [i]} if input.child_input is None else input.child_input
        await ctx.spawn(input.child_type, child_input, key=f"part-{i}")
    await ctx.progress(0.5, f"spawned {input.n}")
    if input.fail_first_attempt and ctx.attempt == 1:
        raise RetryableError("failed after spawning")
    return ctx.wait_for_children()


def blocking_sleep(input: Seconds, ctx: SyncContext) -> dict[str, Any]:
    """A Celery-style task: plain, blocking, in ten steps, reporting progress from its thread."""
    for step in range(1, 11):
        time.sleep(input.seconds / 10)
        ctx.progress(step / 10, f"step {step}")
    return {"slept": input.seconds, "thread": threading.current_thread().name}


def cpu_loop(input: Seconds, ctx: SyncContext) -> dict[str, Any]:
    """Pure-Python CPU work for `seconds`, holding its own GIL: in a process of its own, the worker's loop runs on."""
    ctx.log("info", f"pid {os.getpid()}")
    began = reported = time.monotonic()
    loops = 0
    while (now := time.monotonic()) - began < input.seconds:
        loops += sum(i * i for i in range(2_000)) > 0
        if now - reported > 0.5:
            ctx.progress(min(1.0, (now - began) / input.seconds), f"{loops} loops")
            reported = now
    return {"pid": os.getpid(), "loops": loops}


def plain_refuse(input: Nothing, ctx: SyncContext) -> None:
    raise JobError("the input can never work", type="bad_input")


def plain_unencodable(input: Nothing, ctx: SyncContext) -> object:
    return object()


JOB_TYPES = (
    # plain functions: tests/test_executors.py
    JobType("blocking_sleep", Seconds, blocking_sleep, timeout_s=60),
    JobType("cpu_loop", Seconds, cpu_loop, executor="process", timeout_s=600),
    JobType("plain_refuse", Nothing, plain_refuse, executor="process", timeout_s=10),
    JobType("plain_unencodable", Nothing, plain_unencodable, executor="process", timeout_s=10),
    # spawned children: tests/test_spawn.py
    JobType("fan_out", FanOut, fan_out, timeout_s=30),
    # workflows: tests/test_workflows.py
    JobType("count_up", Count, count_up, timeout_s=10),
    JobType("square_item", Of, square_item, timeout_s=10),
    JobType("upstream", Nothing, upstream, timeout_s=10),
    JobType("block_first", Seconds, block_first, timeout_s=600),
    JobType("sleep_once", Seconds, sleep_once, retry_safe=False, timeout_s=600),
    JobType("explode", Nothing, explode, timeout_s=10),
    JobType("refuse", Nothing, refuse, timeout_s=10),
    JobType("unencodable", Nothing, unencodable, timeout_s=10),
    JobType("unstorable", Unstorable, unstorable, timeout_s=10),
    JobType("event_loop", Nothing, event_loop, timeout_s=10),
    JobType("pool_pid", Nothing, pool_pid, timeout_s=60),
    JobType("big_int", Digits, big_int, timeout_s=10),
    JobType("raw_result", Text, raw_result, timeout_s=10),
    JobType("chatty", Lines, chatty, timeout_s=10),
    # at most two of one concurrency_key at once: tests/test_scheduling.py
    JobType("keyed", Seconds, sleep_once, timeout_s=60, concurrency=2),
    # at most five starts a second, bursts of five
    JobType("rated", Seconds, sleep_once, timeout_s=60, rate=Rate(5, 1.0)),
)
