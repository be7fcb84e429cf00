"""The seed demo's twin: the sum of the cubes of a list of integers."""

from typing import Annotated

import msgspec

from worker.job import Context, JobType


class Input(msgspec.Struct, forbid_unknown_fields=True):
    data: Annotated[list[int], msgspec.Meta(min_length=1, max_length=100_000)]


async def run(input: Input, ctx: Context) -> int:
    total = 0
    step = max(1, len(input.data) // 20)
    for i, x in enumerate(input.data, 1):
        total += x * x * x
        if i % step == 0:
            await ctx.progress(i / len(input.data))
    return total


JOB_TYPE = JobType("cube_sum", Input, run, timeout_s=60, description="Sum of the cubes of `data`.")
