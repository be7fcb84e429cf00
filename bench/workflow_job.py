"""The workflow bench's job types (OUTLAST_JOB_MODULES=...,bench.workflow_job): a step that returns n items, and a
fan-in that counts what reached it. The mapped step is bench/noop_job.py's `noop`: it does nothing with its item."""

import msgspec

from worker import Context, JobType


class Items(msgspec.Struct, forbid_unknown_fields=True):
    n: int


async def items(input: Items, ctx: Context) -> list[int]:
    return list(range(input.n))


class Join(msgspec.Struct, forbid_unknown_fields=True):
    of: str


async def join(input: Join, ctx: Context) -> int:
    return len(ctx.upstream[input.of])


JOB_TYPES = (
    JobType("bench_items", Items, items, timeout_s=60, description="A list of n items: the map's source."),
    JobType("bench_join", Join, join, timeout_s=60, description="How many results reached the fan-in."),
)
