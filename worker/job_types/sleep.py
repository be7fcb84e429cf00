"""The stand-in for a long job: sleeps `seconds` in `steps` steps, reporting progress after each, and logs its plan."""

import asyncio
from typing import Annotated

import msgspec

from worker.job import Context, JobType


class Input(msgspec.Struct, forbid_unknown_fields=True):
    seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 1.0
    steps: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10


class Output(msgspec.Struct):
    slept_s: float
    steps: int


async def run(input: Input, ctx: Context) -> Output:
    await ctx.log("info", f"sleeping {input.seconds:g} s in {input.steps} steps")
    for step in range(1, input.steps + 1):
        await asyncio.sleep(input.seconds / input.steps)
        await ctx.progress(step / input.steps, f"step {step} of {input.steps}")
    return Output(slept_s=input.seconds, steps=input.steps)


JOB_TYPE = JobType("sleep", Input, run, timeout_s=86_400, description="Sleep, reporting progress each step.")
