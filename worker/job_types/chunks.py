"""The workflow demo (docs/workflows.md): `split` a list into chunks, `chunk_sum` each chunk in a job of its own (a
map step), `total` the chunks' sums (the fan-in). The sum of the squares of 1..100, the long way round:

{"steps": [{"name": "chunks", "type": "split", "input": {"data": [1, 2, …, 100], "size": 10}},
           {"name": "sums", "type": "chunk_sum", "map": "chunks", "input": {"of": "chunks"}},
           {"name": "total", "type": "total", "after": ["sums"], "input": {"of": "sums"}}]}

And the same in one job whose code spawns the chunks (`spawn_sum`): {"data": [1, 2, …, 100], "size": 10}.
"""

import asyncio
from typing import Annotated

import msgspec

from worker.job import Context, JobError, JobType, Waiting

Item = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Split(msgspec.Struct, forbid_unknown_fields=True):
    data: Annotated[list[Item], msgspec.Meta(min_length=1, max_length=100_000)]
    size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10


async def split(input: Split, ctx: Context) -> list[list[int]]:
    return [input.data[n : n + input.size] for n in range(0, len(input.data), input.size)]


class ChunkSum(msgspec.Struct, forbid_unknown_fields=True):
    of: str  # the step mapped over: ctx.upstream[of] is this job's chunk
    power: Annotated[int, msgspec.Meta(ge=1, le=3)] = 2
    seconds: Annotated[float, msgspec.Meta(ge=0, le=3_600)] = 0.0  # spent on each chunk, to watch a map move


async def chunk_sum(input: ChunkSum, ctx: Context) -> int:
    chunk = ctx.upstream.get(input.of)
    if not isinstance(chunk, list) or not all(isinstance(x, int) for x in chunk):
        raise JobError(f"ctx.upstream[{input.of!r}] is not a list of integers: map this step over a split")
    for n in range(1, len(chunk) + 1):
        await asyncio.sleep(input.seconds / len(chunk))
        await ctx.progress(n / len(chunk), f"{n} of {len(chunk)}")
    return sum(x**input.power for x in chunk)


class Total(msgspec.Struct, forbid_unknown_fields=True):
    of: str  # the step whose results it adds up


async def total(input: Total, ctx: Context) -> int:
    parts = ctx.upstream.get(input.of)
    if not isinstance(parts, list) or not all(isinstance(x, int) for x in parts):
        raise JobError(f"ctx.upstream[{input.of!r}] is not a list of integers: put this step after a map")
    return sum(parts)


async def spawn_sum(input: Split, ctx: Context) -> int | Waiting:
    """A `square_sum` child per chunk, spawned by this job's code; it waits for them holding no slot, then adds up."""
    if ctx.children:
        failed = sorted(key for key, child in ctx.children.items() if child.status != "succeeded")
        if failed:
            raise JobError(f"chunks {', '.join(failed)} did not succeed")
        return sum(int(child.result) for child in ctx.children.values())
    chunks = await split(input, ctx)
    for n, chunk in enumerate(chunks):
        await ctx.spawn("square_sum", {"data": chunk}, key=f"chunk-{n}")
    await ctx.progress(0.5, f"waiting for {len(chunks)} chunks")
    return ctx.wait_for_children()


SPLIT = JobType("split", Split, split, timeout_s=60, description="`data` in chunks of `size`: a map's source.")
CHUNK_SUM = JobType(
    "chunk_sum", ChunkSum, chunk_sum, timeout_s=3_700, description="Sum of the powers of the chunk it is mapped over."
)
TOTAL = JobType("total", Total, total, timeout_s=60, description="The sum of the results of the step it comes after.")
SPAWN_SUM = JobType(
    "spawn_sum", Split, spawn_sum, timeout_s=60, description="Sum of squares, a spawned square_sum job per chunk."
)
