"""The seed demo: the sum of the squares of a list of integers."""

from typing import Annotated

import msgspec

from worker.job import Context, JobType, in_process_pool

OFF_LOOP_ABOVE = 10_000  # longer inputs are summed in a process pool, so the heartbeat keeps its beat


class Input(msgspec.Struct, forbid_unknown_fields=True):
    data: Annotated[list[int], msgspec.Meta(min_length=1, max_length=100_000)]


def total(data: list[int]) -> int:
    return sum(x**2 for x in data)


async def run(input: Input, ctx: Context) -> int:
    if len(input.data) > OFF_LOOP_ABOVE:
        await ctx.progress(0.0, "summing in a worker process")
        return await in_process_pool(total, input.data)
    return total(input.data)


JOB_TYPE = JobType("square_sum", Input, run, timeout_s=60, description="Sum of the squares of `data`.")
