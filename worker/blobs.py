"""The blob store (claim-check): results too large for the jobs row, the files a job writes with `ctx.output`, and
uploads (POST /v1/uploads), read by range and never whole.

A blob is a row of `blobs` (what it is, whose, how large) and its bytes, kept by a backend: `Chunks`, 1 MiB rows of
`blob_chunks` in PostgreSQL (the default: the embedded database needs nothing else), or objects in S3-compatible
storage when OUTLAST_BLOB_URL is `s3://bucket/prefix` (worker/blobs_s3.py). Its row is written first with no size,
its bytes next, then its size: a reader sees only blobs whose bytes are all there, and a writer that dies half-way
leaves a row without a size, which retention deletes a day later.

A blob is written before the transition that names it (a result before its job's finish), and deleted after the
rows that name it: a job's blobs lose their `job_id` when the job is deleted (ON DELETE SET NULL), and `retain`
deletes such blobs, their bytes before their rows, a bounded batch a pass.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, Protocol
from urllib.parse import quote
from uuid import UUID

import msgspec
from databases import Database
from uuid_utils.compat import uuid7

from worker import sql
from worker.config import Config

log = logging.getLogger("outlast.blobs")
CHUNK_BYTES: Final = 1 << 20
READ_AHEAD: Final = 2  # chunks a stream fetches ahead of the one it sends (bench/blob_stream.py)
UNFINISHED_AFTER_S: Final = 86_400.0  # a blob still without its size this long after it began: its writer died
RETAIN_BATCH: Final = 50  # blobs deleted a pass at most: a blob may be a GiB, so fewer than the sweep's rows

Kind = Literal["result", "output", "upload"]
Source = bytes | str | Iterable[bytes] | AsyncIterable[bytes]


class Blob(msgspec.Struct, frozen=True, kw_only=True):
    """A blob whose bytes are all stored."""

    id: UUID
    tenant_id: str
    kind: Kind
    job_id: UUID | None
    attempt: int | None
    name: str
    content_type: str
    size: int
    created_at: datetime


class File(msgspec.Struct, frozen=True):
    """A file a job wrote with `ctx.output`, as its result may list it: `link` serves it (the job's read token, or an
    API key, opens it)."""

    name: str
    size: int
    content_type: str
    link: str


def file_link(job_id: UUID, name: str) -> str:
    return f"/v1/jobs/{job_id}/result?file={quote(name, safe='')}"


class TooLarge(Exception):
    """The bytes passed the blob's cap: nothing of it is kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class Backend(Protocol):
    """Where a blob's bytes live, by the blob's id."""

    async def put(self, blob_id: UUID, pieces: AsyncIterator[bytes]) -> None: ...

    def get(self, blob_id: UUID, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes [start, end) of a stored blob, in pieces."""
        ...

    async def delete(self, blob_ids: Sequence[UUID]) -> None:
        """Forget these blobs' bytes; one already gone is no error."""
        ...


_PUT_CHUNK = "INSERT INTO blob_chunks (blob_id, seq, data) VALUES (:id, :seq, :data)"
# A chunk the range covers whole is sent as it is stored: substring() of a TOASTed value cost PostgreSQL 3.5 times
# the CPU of the value itself (0.47 against 0.13 s per 100 MB, bench/blob_stream.py), and most chunks of a
# download are whole. octet_length() reads only the value's header.
_GET_CHUNK = """
SELECT CASE WHEN :start = 1 AND octet_length(data) <= :length THEN data ELSE substring(data FROM :start FOR :length)
       END
  FROM blob_chunks WHERE blob_id = :id AND seq = :seq
"""


@dataclass(frozen=True)
class Chunks:
    """Bytes in PostgreSQL, a row per CHUNK_BYTES: a read fetches only the chunks its range covers, one at a time, so
    a stream holds a chunk in memory, never the blob. Each chunk commits on its own: no transaction holds a 1 GiB
    upload's locks and WAL."""

    db: Database

    async def put(self, blob_id: UUID, pieces: AsyncIterator[bytes]) -> None:
        seq = 0
        async for piece in pieces:
            await sql.execute(self.db, _PUT_CHUNK, {"id": blob_id, "seq": seq, "data": piece})
            seq += 1

    async def get(self, blob_id: UUID, start: int, end: int) -> AsyncIterator[bytes]:
        seqs = range(start // CHUNK_BYTES, (end - 1) // CHUNK_BYTES + 1 if end > start else 0)

        async def fetch(seq: int) -> bytes:
            lo = max(start - seq * CHUNK_BYTES, 0)
            hi = min(end - seq * CHUNK_BYTES, CHUNK_BYTES)
            values = {"id": blob_id, "seq": seq, "start": lo + 1, "length": hi - lo}
            data = await sql.fetch_val(self.db, _GET_CHUNK, values)
            if data is None:
                raise LookupError(f"blob {blob_id} lost its chunk {seq}")
            return bytes(data)

        # The next chunks are on their way (each on a connection of its own) while this one is sent: a stream waits
        # for PostgreSQL's reads side by side rather than one after another, and holds 1 + READ_AHEAD chunks at most.
        ahead: collections.deque[asyncio.Task[bytes]] = collections.deque()
        pending = iter(seqs)
        try:
            while True:
                while len(ahead) <= READ_AHEAD and (seq := next(pending, None)) is not None:
                    ahead.append(asyncio.ensure_future(fetch(seq)))
                if not ahead:
                    return
                yield await ahead.popleft()
        finally:
            for task in ahead:
                task.cancel()

    async def delete(self, blob_ids: Sequence[UUID]) -> None:
        pass  # the chunks go with their blob's row (ON DELETE CASCADE)


async def _pieces(source: Source) -> AsyncIterator[bytes]:
    if isinstance(source, str):
        source = source.encode()
    if isinstance(source, bytes | bytearray | memoryview):
        yield bytes(source)
    elif isinstance(source, AsyncIterable):
        async for piece in source:
            yield bytes(piece)
    else:
        for piece in source:
            yield bytes(piece)


async def rechunked(source: Source, *, limit: int | None = None, size: list[int] | None = None) -> AsyncIterator[bytes]:
    """`source` in pieces of exactly CHUNK_BYTES (the last one shorter), so chunk `n` starts at byte n * CHUNK_BYTES;
    TooLarge as soon as more than `limit` bytes came. `size[0]` counts them."""
    buffer = bytearray()
    total = 0
    async for piece in _pieces(source):
        total += len(piece)
        if limit is not None and total > limit:
            raise TooLarge(limit)
        if size is not None:
            size[0] = total
        buffer += piece
        while len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer[:CHUNK_BYTES])
            del buffer[:CHUNK_BYTES]
    if buffer:
        yield bytes(buffer)


_COLUMNS = "id, tenant_id, kind, job_id, attempt, name, content_type, size, created_at"
_BEGIN = """
INSERT INTO blobs (id, tenant_id, kind, job_id, attempt, name, content_type)
VALUES (:id, :tenant, :kind, :job, :attempt, :name, :content_type)
"""
_FINISHED = f"UPDATE blobs SET size = :size WHERE id = :id RETURNING {_COLUMNS}"
_DISCARD = "DELETE FROM blobs WHERE id = :id"
_GET = f"SELECT {_COLUMNS} FROM blobs WHERE id = :id AND tenant_id = :tenant AND kind = :kind AND size IS NOT NULL"
# The newest of a name: a job that writes a name twice means its second file.
_OF_JOB = f"""
SELECT {_COLUMNS} FROM blobs
 WHERE job_id = :job AND attempt = :attempt AND kind = :kind AND name = :name AND size IS NOT NULL
 ORDER BY created_at DESC, id DESC LIMIT 1
"""
_FILES = f"""
SELECT DISTINCT ON (name) {_COLUMNS} FROM blobs
 WHERE job_id = :job AND attempt = :attempt AND kind = 'output' AND size IS NOT NULL
 ORDER BY name, created_at DESC, id DESC
"""
# Each through its partial index (migrations/0025): blobs whose job was deleted, uploads past the jobs' retention,
# and writes that never finished.
_DOOMED = """
(SELECT id FROM blobs WHERE job_id IS NULL AND kind <> 'upload' ORDER BY created_at LIMIT :batch)
UNION
(SELECT id FROM blobs WHERE kind = 'upload' AND created_at < now() - make_interval(secs => :retention)
  ORDER BY created_at LIMIT :batch)
UNION
(SELECT id FROM blobs WHERE size IS NULL AND created_at < now() - make_interval(secs => :unfinished)
  ORDER BY created_at LIMIT :batch)
LIMIT :batch
"""
_DELETE = "DELETE FROM blobs WHERE id = ANY(CAST(:ids AS uuid[]))"


def _blob(record: object) -> Blob:
    return msgspec.convert(dict(record), Blob)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Blobs:
    """The blob store: rows in PostgreSQL, bytes in `backend`."""

    db: Database
    backend: Backend

    async def write(
        self,
        source: Source,
        *,
        tenant: str,
        kind: Kind,
        content_type: str,
        job_id: UUID | None = None,
        attempt: int | None = None,
        name: str = "",
        limit: int | None = None,
    ) -> Blob:
        """Store `source`'s bytes as a new blob; TooLarge (and nothing kept) past `limit` bytes."""
        blob_id = uuid7()
        values = {"id": blob_id, "tenant": tenant, "kind": kind, "job": job_id, "attempt": attempt, "name": name}
        await sql.execute(self.db, _BEGIN, {**values, "content_type": content_type})
        size = [0]
        try:
            await self.backend.put(blob_id, rechunked(source, limit=limit, size=size))
            record = await sql.fetch_one(self.db, _FINISHED, {"id": blob_id, "size": size[0]})
        except BaseException:
            await asyncio.shield(self._discard(blob_id))
            raise
        return _blob(record)

    async def _discard(self, blob_id: UUID) -> None:
        try:
            await self.backend.delete([blob_id])
            await sql.execute(self.db, _DISCARD, {"id": blob_id})
        except Exception:  # left for retention's pass over unfinished writes
            log.warning("blob %s: its bytes could not be discarded; retention deletes them", blob_id)

    async def upload(self, tenant: str, upload_id: UUID) -> Blob | None:
        """The tenant's upload of that id, once its bytes are all in."""
        return await self._one(_GET, {"id": upload_id, "tenant": tenant, "kind": "upload"})

    async def of_job(self, job_id: UUID, attempt: int, kind: Kind, name: str = "") -> Blob | None:
        """The result (kind `result`) or the output `name` this attempt of the job wrote."""
        return await self._one(_OF_JOB, {"job": job_id, "attempt": attempt, "kind": kind, "name": name})

    async def files(self, job_id: UUID, attempt: int) -> list[File]:
        """The files this attempt wrote with `ctx.output`, by name."""
        rows = [_blob(r) for r in await sql.fetch_all(self.db, _FILES, {"job": job_id, "attempt": attempt})]
        return [File(b.name, b.size, b.content_type, file_link(job_id, b.name)) for b in rows]

    async def _one(self, query: str, values: sql.Values) -> Blob | None:
        record = await sql.fetch_one(self.db, query, values)
        return None if record is None else _blob(record)

    def read(self, blob: Blob, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The blob's bytes [start, end), a chunk at a time."""
        end = blob.size if end is None else min(end, blob.size)
        return self.backend.get(blob.id, start, end)

    async def read_all(self, blob: Blob) -> bytes:
        return b"".join([piece async for piece in self.read(blob)])

    async def retain(self, *, retention_s: float, batch: int = RETAIN_BATCH) -> int:
        """Delete one batch of blobs no row names any more (their job was deleted), uploads past `retention_s` and
        writes that never finished: their bytes, then their rows. A crash between the two leaves rows that the next
        pass deletes again."""
        values = {"batch": batch, "retention": retention_s, "unfinished": UNFINISHED_AFTER_S}
        ids = [r["id"] for r in await sql.fetch_all(self.db, _DOOMED, values)]
        if ids:
            await self.backend.delete(ids)
            await sql.execute(self.db, _DELETE, {"ids": ids})
        return len(ids)


@dataclass(frozen=True)
class Upload:
    """An upload as a job reads it (`ctx.open`): whole with `read()`, or a chunk at a time with `chunks()`."""

    blob: Blob
    store: Blobs

    @property
    def id(self) -> UUID:
        return self.blob.id

    @property
    def name(self) -> str:
        return self.blob.name

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def content_type(self) -> str:
        return self.blob.content_type

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        return self.store.read(self.blob, start, end)

    async def read(self) -> bytes:
        return await self.store.read_all(self.blob)


@dataclass(frozen=True)
class ForJob:
    """`ctx.output` and `ctx.open` for one attempt of one job: its files are its tenant's, named by job and attempt,
    and it opens its own tenant's uploads only."""

    store: Blobs
    tenant: str
    job_id: UUID
    attempt: int

    async def output(self, name: str, data: Source, content_type: str) -> File:
        from worker.job import JobError  # here: worker.job names this module's types

        if not name or len(name) > 255 or "\x00" in name:
            raise JobError(f"an output's name must be 1 to 255 characters without NUL, not {name[:50]!r}",
                           type="invalid_output")  # fmt: skip
        blob = await self.store.write(
            data, tenant=self.tenant, kind="output", content_type=content_type, job_id=self.job_id,
            attempt=self.attempt, name=name,
        )  # fmt: skip
        return File(name, blob.size, content_type, file_link(self.job_id, name))

    async def open(self, upload_id: str) -> Upload:
        from worker.job import JobError

        try:
            found = await self.store.upload(self.tenant, UUID(str(upload_id)))
        except ValueError:
            found = None
        if found is None:
            raise JobError(f"no upload {str(upload_id)[:100]!r} of this tenant", type="unknown_upload")
        return Upload(found, self.store)


def of(config: Config, db: Database) -> Blobs:
    """The deployment's blob store: S3-compatible storage when OUTLAST_BLOB_URL says so, else PostgreSQL."""
    if not config.blob_url:
        return Blobs(db, Chunks(db))
    return Blobs(db, _s3(config.blob_url))


@functools.cache
def _s3(url: str) -> Backend:
    from worker.blobs_s3 import S3  # here: obstore loads only where a deployment uses it

    return S3.from_url(url)
