"""The blob store's bytes in S3-compatible storage (OUTLAST_BLOB_URL=s3://bucket/prefix), through obstore.

obstore: one wheel (5.6 MB, no Python dependencies) around the Rust `object_store` crate, with native asyncio
calls, multipart puts from an async iterator, ranged gets as a stream and batched deletes. Credentials, region and
endpoint come from the usual AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_ENDPOINT_URL for MinIO, R2 and the like; AWS_ALLOW_HTTP for a plain-http endpoint), as every S3 tool reads them.
An object is named by its blob's id under the prefix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from uuid import UUID

import obstore
from obstore.store import S3Store

PART_BYTES = 8 << 20  # a multipart upload's parts: S3 takes 5 MiB at least but for the last


@dataclass(frozen=True)
class S3:
    store: S3Store

    @classmethod
    def from_url(cls, url: str) -> S3:
        return cls(S3Store.from_url(url))

    async def put(self, blob_id: UUID, pieces: AsyncIterator[bytes]) -> None:
        await obstore.put_async(self.store, str(blob_id), pieces, chunk_size=PART_BYTES, max_concurrency=4)

    async def get(self, blob_id: UUID, start: int, end: int) -> AsyncIterator[bytes]:
        if end <= start:
            return
        got = await obstore.get_async(self.store, str(blob_id), options={"range": (start, end)})
        async for piece in got.stream(min_chunk_size=1 << 20):
            yield bytes(piece)

    async def delete(self, blob_ids: Sequence[UUID]) -> None:
        if blob_ids:
            await obstore.delete_async(self.store, [str(b) for b in blob_ids])
