"""A tenant's vectors in PostgreSQL with pgvector, by collection: `ctx.vectors` in a job, the store behind the
built-in `vector_index` and `vector_search` (migrations/vectors/ holds the tables).

A collection's dimensions, and the model that made its vectors (None for vectors given as numbers), are fixed by
its first vectors. Scores are cosine similarities, 1 the same direction; a search of a common size (256, 384, 512,
768, 1024, 1536) goes through that size's HNSW index, iteratively (pgvector >= 0.8) so that a collection among
many still gets its k; other sizes are searched exactly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
from databases import Database

from worker import sql
from worker.job import JobError
from worker.vectors.schema import UNAVAILABLE, version_of

INDEXED_SIZES = frozenset((256, 384, 512, 768, 1024, 1536))  # migrations/vectors/0027_vectors.sql
# Rows per INSERT, in one transaction, progress between them. Each row's HNSW insert costs PostgreSQL 2.5 to 5 ms of
# CPU (bench/vectors.py), so a statement of 1,000 could pass the pool's 30 s command timeout on a busy machine
# (one did, at a load of 18 on two cores): 200 stay well inside it.
CHUNK = 200
_encode = msgspec.json.Encoder().encode


class VectorsUnavailable(JobError):
    type = "vectors_unavailable"


class DimensionMismatch(JobError):
    type = "dimension_mismatch"


class ModelMismatch(JobError):
    type = "model_mismatch"


class UnknownCollection(JobError):
    type = "unknown_collection"


class Match(msgspec.Struct, frozen=True):
    id: int
    score: float
    text: str | None
    metadata: dict[str, Any]


_INSERT = """
INSERT INTO vector_items (tenant_id, collection, dimensions, embedding, text, metadata, job_id)
SELECT :tenant, :collection, CAST(:dims AS int),
       CAST((CAST(:flat AS real[]))[(i - 1) * CAST(:dims AS int) + 1 : i * CAST(:dims AS int)] AS vector),
       (CAST(:texts AS text[]))[i], (CAST(:metadata AS jsonb[]))[i], CAST(:job_id AS uuid)
  FROM generate_series(1, CAST(:n AS int)) AS i
 ORDER BY i
RETURNING id
"""
_COLLECTION = "SELECT dimensions, model FROM vector_collections WHERE tenant_id = :tenant AND name = :collection"
_versions: dict[int, tuple[int, ...]] = {}  # pgvector's version per Database: a search's plan depends on it


def _search_sql(dims: int) -> str:
    target = f"CAST(embedding AS vector({dims})) <=> CAST(CAST(:query AS real[]) AS vector({dims}))"  # dims: an int
    return (
        f"SELECT id, text, metadata, 1 - ({target}) AS score FROM vector_items"
        " WHERE tenant_id = :tenant AND collection = :collection AND dimensions = :dims"
        f" ORDER BY {target} LIMIT :k"
    )


def _unavailable(exc: Exception) -> VectorsUnavailable:
    return VectorsUnavailable(f"{UNAVAILABLE} ({type(exc).__name__}: {exc})")


class Vectors:
    """One tenant's collections: what a job reaches as `ctx.vectors`, never another tenant's."""

    def __init__(self, db: Database | None, tenant: str) -> None:
        self._db, self.tenant = db, tenant

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("this Context was made without a worker: it has no vector store")
        return self._db

    async def add(
        self,
        collection: str,
        vectors: Sequence[Sequence[float]],
        *,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        model: str | None = None,
        job_id: UUID | None = None,
        stored: Callable[[int], Awaitable[None]] | None = None,
    ) -> list[int]:
        """Store `vectors` (all of one size) in `collection`, created by the first; their ids, in order. All or
        nothing: a vector of another size than the collection's stores none. `stored(n)` is awaited after each
        chunk, with the count so far: each row's HNSW insert makes storing the slow half of indexing."""
        dims = len(vectors[0])
        values = {"tenant": self.tenant, "collection": collection}
        try:
            async with self.db.transaction():
                await sql.execute(
                    self.db,
                    "INSERT INTO vector_collections (tenant_id, name, dimensions, model)"
                    " VALUES (:tenant, :collection, :dims, :model) ON CONFLICT DO NOTHING",
                    {**values, "dims": dims, "model": model},
                )
                row = await sql.fetch_one(self.db, _COLLECTION + " FOR SHARE", values)
                assert row is not None
                self._check(collection, row, dims, model)
                records = []
                for start in range(0, len(vectors), CHUNK):
                    part = range(start, min(start + CHUNK, len(vectors)))
                    args = {
                        **values,
                        "dims": dims,
                        "flat": [float(x) for n in part for x in vectors[n]],
                        "texts": [texts[n] for n in part] if texts is not None else [None] * len(part),
                        "metadata": [_encode(metadata[n] if metadata else {}).decode() for n in part],
                        "job_id": job_id,
                        "n": len(part),
                    }
                    records += await sql.fetch_all(self.db, _INSERT, args)
                    if stored is not None:
                        await stored(len(records))
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedObjectError) as exc:
            raise _unavailable(exc) from None
        return [int(r["id"]) for r in records]

    async def search(
        self, collection: str, vector: Sequence[float], k: int = 10, *, model: str | None = None
    ) -> list[Match]:
        """The `k` vectors of `collection` nearest `vector` (cosine), best first."""
        values = {"tenant": self.tenant, "collection": collection}
        try:
            row = await sql.fetch_one(self.db, _COLLECTION, values)
            if row is None:
                raise UnknownCollection(f"tenant {self.tenant!r} has no vector collection {collection!r}")
            dims = len(vector)
            self._check(collection, row, dims, model, searching=True)
            args = {**values, "dims": dims, "query": [float(x) for x in vector], "k": k}
            async with self.db.transaction():
                if dims in INDEXED_SIZES and await self._version() >= (0, 8):
                    # The index walks past other tenants' and collections' neighbours until k of ours are found.
                    await sql.execute(self.db, "SET LOCAL hnsw.iterative_scan = strict_order")
                records = await sql.fetch_all(self.db, _search_sql(dims), args)
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedObjectError) as exc:
            raise _unavailable(exc) from None
        return [
            Match(int(r["id"]), round(float(r["score"]), 6), r["text"], msgspec.json.decode(r["metadata"]))
            for r in records
        ]

    async def _version(self) -> tuple[int, ...]:
        key = id(self.db)
        if key not in _versions:
            found = await sql.fetch_val(self.db, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            _versions[key] = version_of(found or "0")
        return _versions[key]

    @staticmethod
    def _check(collection: str, row: Any, dims: int, model: str | None, *, searching: bool = False) -> None:
        if row["dimensions"] != dims:
            what = "the query vector has" if searching else "these vectors have"
            raise DimensionMismatch(
                f"collection {collection!r} holds vectors of {row['dimensions']} dimensions; {what} {dims}"
            )
        if row["model"] != model and (model is not None or not searching):
            made = f"texts embedded by {row['model']}" if row["model"] else "vectors given as numbers"
            given = f"texts embedded by {model}" if model else "vectors given as numbers"
            raise ModelMismatch(f"collection {collection!r} holds {made}, not {given}: distances would mean nothing")


def for_job(db: Database, tenant: str) -> Vectors:
    return Vectors(db, tenant)
