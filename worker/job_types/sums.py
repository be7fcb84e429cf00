"""The seed demo: the sum of the squares (`square_sum`) or cubes (`cube_sum`) of a list of integers."""

from functools import partial
from typing import Annotated

import msgspec

from worker.job import Context, JobType, in_process_pool

OFF_LOOP_ABOVE = 10_000  # longer inputs are summed in a process pool, so the heartbeat keeps its beat


# An int64's range: the sum of 100,000 cubes of these still prints (Python refuses int -> str past 4,300 digits).
Item = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Input(msgspec.Struct, forbid_unknown_fields=True):
    data: Annotated[list[Item], msgspec.Meta(min_length=1, max_length=100_000)]


def total(power: int, data: list[int]) -> int:
    return sum(x**power for x in data)


async def run(power: int, input: Input, ctx: Context) -> int:
    if len(input.data) > OFF_LOOP_ABOVE:
        await ctx.progress(0.0, "summing in a worker process")
        return await in_process_pool(total, power, input.data)
    return total(power, input.data)


SQUARE_SUM = JobType("square_sum", Input, partial(run, 2), timeout_s=60, description="Sum of the squares of `data`.")
CUBE_SUM = JobType("cube_sum", Input, partial(run, 3), timeout_s=60, description="Sum of the cubes of `data`.")
