"""`vector_index` and `vector_search`: a tenant's vectors by collection, in PostgreSQL with pgvector (ctx.vectors).

    {"vector_data": [0.1, 0.2, 0.3], "metadata": {"source": "user"}}    (the seeds' own body)
    → {"processed_vectors": 3, "status": "indexed", "collection": "default", "dimensions": 3, "ids": [1], ...}
    {"collection": "docs", "texts": ["a cat sat on the mat", ...]}       (embedded by the bundled model)
    {"collection": "docs", "query": "kittens", "k": 3}
    → {"collection": "docs", "matches": [{"id": 1, "score": 0.71, "text": "a cat sat on the mat", "metadata": {}}]}

What a submit can be refused for is refused there (422): a collection name with odd characters, neither or both of
texts and vector_data, a mix of numbers and lists, vectors of several sizes, a zero vector. What only the collection
knows fails the job with a named error: `dimension_mismatch`, `model_mismatch`, `unknown_collection`, and
`vectors_unavailable` where the database has no pgvector. docs/job-types.md "vector_index and vector_search"
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

from worker.job import Context, JobType
from worker.vectors import embed

Collection = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", max_length=64)]
Vector = Annotated[list[float], msgspec.Meta(min_length=1, max_length=2_000)]  # HNSW's limit for `vector`
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=20_000)]
Metadata = dict[str, Any]
MAX_ITEMS = 10_000
EMBED_SHARE = 0.2  # of the progress bar: embedding is the quick part, each vector's HNSW insert the slow one


def _vectors(data: list[float | list[float]]) -> list[list[float]]:
    flat = [x for x in data if not isinstance(x, list)]
    nested = [v for v in data if isinstance(v, list)]
    if flat and nested:
        raise ValueError("must be one vector or a list of vectors, not a mix of numbers and lists")
    return nested or [[float(x) for x in flat]]


def _check_vector(vector: list[float], where: str) -> None:
    if not all(math.isfinite(x) for x in vector) or not any(vector):
        raise ValueError(f"{where} is a zero vector, or holds a number that is not finite: it has no direction")


class IndexInput(msgspec.Struct, forbid_unknown_fields=True):
    collection: Collection = "default"
    # One vector, or a list of them: the seeds' clients send both.
    vector_data: Annotated[list[float | Vector], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)] | None = None
    texts: Annotated[list[Text], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)] | None = None
    # One object for every item, or one per item, in order.
    metadata: Metadata | Annotated[list[Metadata], msgspec.Meta(max_length=MAX_ITEMS)] = {}

    def __post_init__(self) -> None:  # a ValueError here is a 422 at submit, naming it
        if (self.vector_data is None) == (self.texts is None):
            raise ValueError("give either `texts` or `vector_data`, not both and not neither")
        count = len(self.texts) if self.texts is not None else len(self.items())
        if self.vector_data is not None:
            vectors = self.items()
            for n, vector in enumerate(vectors):
                _check_vector(vector, f"vector {n}")
                if len(vector) != len(vectors[0]):
                    raise ValueError(f"vector {n} has {len(vector)} dimensions, vector 0 has {len(vectors[0])}")
        if isinstance(self.metadata, list) and len(self.metadata) != count:
            raise ValueError(f"`metadata` is a list of {len(self.metadata)} objects for {count} items")

    def items(self) -> list[list[float]]:
        return _vectors(self.vector_data or [])


class Indexed(msgspec.Struct):
    processed_vectors: int  # the seeds' count: the items of vector_data (or texts), kept so its clients read it
    status: str
    collection: str
    dimensions: int
    indexed: int  # the vectors stored
    ids: list[int]
    metadata: Metadata | list[Metadata]


async def index(input: IndexInput, ctx: Context) -> Indexed:
    texts: list[str | None] | None = None
    model = None
    if input.texts is not None:
        vectors = await embed.embed(input.texts, ctx, share=EMBED_SHARE)
        texts, model = list(input.texts), embed.MODEL
    else:
        vectors = input.items()
    metadata = input.metadata if isinstance(input.metadata, list) else [input.metadata] * len(vectors)
    start = EMBED_SHARE if texts is not None else 0.0

    async def stored(n: int) -> None:
        await ctx.progress(start + (1 - start) * n / len(vectors), f"stored {n} of {len(vectors)} vectors")

    ids = await ctx.vectors.add(
        input.collection, vectors, texts=texts, metadata=metadata, model=model, job_id=ctx.job_id, stored=stored
    )
    await ctx.progress(1.0, f"{len(ids)} vectors indexed in {input.collection}")
    processed = len(input.texts) if input.texts is not None else len(input.vector_data or [])
    return Indexed(processed, "indexed", input.collection, len(vectors[0]), len(ids), ids, input.metadata)


class SearchInput(msgspec.Struct, forbid_unknown_fields=True):
    collection: Collection = "default"
    query: Text | None = None  # embedded by the model that embedded the collection's texts
    vector: Vector | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=1_000)] = 10

    def __post_init__(self) -> None:
        if (self.query is None) == (self.vector is None):
            raise ValueError("give either `query` (a text) or `vector`, not both and not neither")
        if self.vector is not None:
            _check_vector(self.vector, "`vector`")


class Found(msgspec.Struct):
    collection: str
    matches: list[Any]  # store.Match, best first


async def search(input: SearchInput, ctx: Context) -> Found:
    if input.query is not None:
        vector = (await embed.embed([input.query], ctx, share=0.5))[0]
        matches = await ctx.vectors.search(input.collection, vector, input.k, model=embed.MODEL)
    else:
        assert input.vector is not None
        matches = await ctx.vectors.search(input.collection, input.vector, input.k)
    return Found(input.collection, list(matches))


VECTOR_INDEX = JobType(
    "vector_index",
    IndexInput,
    index,
    timeout_s=600,
    description="Store vectors, or texts embedded by a bundled 256-dimension model, in a collection of the tenant's.",
)
VECTOR_SEARCH = JobType(
    "vector_search",
    SearchInput,
    search,
    timeout_s=60,
    description="The k vectors of a collection nearest a text or a vector, best first, with their text or metadata.",
)
