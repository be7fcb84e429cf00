"""The `progress` job type: `updates` calls of `ctx.progress` spread evenly over `seconds`, then done.

Registered next to `noop` (OUTLAST_JOB_MODULES=bench.noop_job,bench.progress_job), for the commits-per-job
count: how many writes P progress reports over d seconds cost, against 3 + min(P, 4·d).
"""

import asyncio

import msgspec

from worker import Context, JobType


class Input(msgspec.Struct, forbid_unknown_fields=True):
    updates: int = 0
    seconds: float = 0.0


async def run(input: Input, ctx: Context) -> None:
    """Report n at start + n·d/P, by the clock rather than by P sleeps: a sleep overshoots a little on a busy
    loop, and P of those would stretch the job past d (and so let it earn more writes than 4·d)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(1, input.updates + 1):
        await asyncio.sleep(max(0.0, start + n * input.seconds / input.updates - loop.time()))
        await ctx.progress(n / input.updates, f"{n} of {input.updates}")
    await asyncio.sleep(max(0.0, start + input.seconds - loop.time()))


JOB_TYPE = JobType("progress", Input, run, timeout_s=600, description="Report progress P times over d seconds.")
