"""A job type for tests/test_vectors.py that goes down vector_index's own path (worker/vectors/embed.py: batches in
the worker's process pool, then ctx.vectors) with a stand-in for the model whose one batch takes as long as asked."""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from worker import Context, JobType
from worker.vectors import embed


class Slow(msgspec.Struct):
    seconds: float
    collection: str = "slow"


def sleepy_batch(texts: Sequence[str]) -> list[list[float]]:
    """Blocks its pool process for the seconds its first text names: one batch as long as a huge one."""
    time.sleep(float(texts[0]))
    return [[1.0, float(n)] for n in range(len(texts))]


async def slow_embed(input: Slow, ctx: Context) -> dict[str, object]:
    vectors = await embed.embed([str(input.seconds)], ctx, batch=sleepy_batch)
    ids = await ctx.vectors.add(input.collection, vectors, texts=["slow"], job_id=ctx.job_id)
    return {"ids": ids}


JOB_TYPE = JobType("slow_embed", Slow, slow_embed, max_attempts=1)
