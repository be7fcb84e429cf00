"""The seeds' vector-indexing Celery task, ported to Outlast (docs/from-celery.md). Its request body works as is:
{"vector_data": [0.1, 0.2, 0.3], "metadata": {"source": "user"}} -> {"processed_vectors": 3, "status": "indexed", ...}

Run it: OUTLAST_JOB_MODULES=vectors PYTHONPATH=docs/examples make run
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

from worker import Context, JobError, JobType

Vector = Annotated[list[float], msgspec.Meta(min_length=1, max_length=4_096)]


class Input(msgspec.Struct, forbid_unknown_fields=True):
    # one vector, or a list of them: the seed's clients send both
    vector_data: Annotated[list[float | Vector], msgspec.Meta(min_length=1, max_length=10_000)]
    metadata: dict[str, Any] = {}


class Indexed(msgspec.Struct):
    processed_vectors: int
    dimensions: int
    status: str
    norms: list[float]
    metadata: dict[str, Any]


async def index_vectors(input: Input, ctx: Context) -> Indexed:
    flat = [x for x in input.vector_data if isinstance(x, float)]
    vectors = [v for v in input.vector_data if isinstance(v, list)]
    if flat and vectors:
        raise JobError("vector_data must be one vector or a list of vectors, not a mix of numbers and lists")
    vectors = vectors or [flat]
    dimensions = len(vectors[0])
    norms = []
    for n, vector in enumerate(vectors, 1):
        if len(vector) != dimensions:
            raise JobError(f"vector {n - 1} has {len(vector)} dimensions, the first has {dimensions}")
        norms.append(round(math.sqrt(sum(x * x for x in vector)), 6))
        if n % 500 == 0 or n == len(vectors):
            await ctx.progress(n / len(vectors), f"{n} of {len(vectors)} vectors")  # was self.update_state(...)
    # the seed's count, kept so its clients read the same answer: the items of vector_data
    return Indexed(len(input.vector_data), dimensions, "indexed", norms, input.metadata)


JOB_TYPE = JobType(
    "index_vectors",
    Input,
    index_vectors,
    timeout_s=600,  # was time_limit=600
    max_attempts=5,  # was max_retries=4 (Outlast counts the first attempt)
    description="The seeds' vector indexing: count, check and measure the vectors it is given.",
)
