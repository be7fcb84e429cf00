"""Job types of tests/test_blobs.py: a large result, files written with ctx.output, an upload read with ctx.open."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec

from worker import Context, JobType, SyncContext
from worker.blobs import File


class Size(msgspec.Struct, forbid_unknown_fields=True):
    bytes: Annotated[int, msgspec.Meta(ge=0)]


def pattern(n: int) -> str:
    """`n` characters that differ from chunk to chunk, so a piece served from the wrong offset shows."""
    return "".join(f"{i:07d}," for i in range(n // 8 + 1))[:n]


async def big_result(input: Size, ctx: Context) -> str:
    return pattern(input.bytes)


async def _pieces(n: int) -> AsyncIterator[bytes]:
    data = pattern(n).encode()
    for i in range(0, n, 100_000):
        yield data[i : i + 100_000]


async def write_files(input: Size, ctx: Context) -> list[File]:
    return [
        await ctx.output("notes.txt", "hello, file", content_type="text/plain"),
        await ctx.output("data.bin", _pieces(input.bytes)),
    ]


class Opened(msgspec.Struct, forbid_unknown_fields=True):
    upload: str


async def read_upload(input: Opened, ctx: Context) -> dict[str, object]:
    upload = await ctx.open(input.upload)
    digest = hashlib.sha256()
    async for piece in upload.chunks():
        digest.update(piece)
    head = b"".join([p async for p in upload.chunks(0, 5)])
    return {"size": upload.size, "sha256": digest.hexdigest(), "head": head.decode(), "type": upload.content_type}


def plain_output(input: Size, ctx: SyncContext) -> File:
    """A plain function, run in a thread, writing a file."""
    file: File = ctx.output("plain.txt", pattern(input.bytes), content_type="text/plain")
    return file


JOB_TYPES = (
    JobType("plain_output", Size, plain_output, timeout_s=60),
    JobType("big_result", Size, big_result, timeout_s=60),
    JobType("write_files", Size, write_files, timeout_s=60),
    JobType("read_upload", Opened, read_upload, timeout_s=60),
)
