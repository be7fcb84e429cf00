"""POST /v1/uploads: a large input streamed into the blob store (worker/blobs.py), a chunk at a time and never whole
in memory, refused with 413 past OUTLAST_MAX_UPLOAD_BYTES. A job input names it by its id; the job reads it with
`ctx.open(id)`, within its own tenant only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from uuid import UUID

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from server.auth import tenant_of
from server.problems import FieldError, InvalidBody, PayloadTooLarge, RequestTimeout, ValidationError
from server.responses import MsgspecResponse
from server.state import web_of
from worker import blobs

NAME_MAX = 255


class Upload(msgspec.Struct, frozen=True):
    """An upload: `id` is what a job's input names, for `ctx.open(id)`."""

    id: UUID
    name: str
    size: int
    content_type: str
    created_at: datetime


async def _within(body: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """The body's pieces, each within `idle_s` of the one before: a stalled sender can't hold the request open, while
    a large body may take as long as it keeps coming."""
    while True:
        try:
            async with asyncio.timeout(idle_s):
                piece = await anext(body)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(f"no part of the body arrived for {idle_s:g} s") from None
        yield piece


async def _not_empty(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body, once its first byte has come: an empty upload is refused before anything is stored."""
    async for first in body:
        if first:
            break
    else:
        msg = "an upload needs a body: this one is empty"
        raise ValidationError(msg, [FieldError("body", msg)])

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for piece in body:
            yield piece

    return rest()


async def create(request: Request) -> Response:
    web = web_of(request)
    limit = web.config.max_upload_bytes
    too_large = PayloadTooLarge(f"an upload may be at most {limit} bytes (OUTLAST_MAX_UPLOAD_BYTES)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    name = request.query_params.get("name", "")
    if len(name) > NAME_MAX or "\x00" in name:
        msg = f"name must be at most {NAME_MAX} characters, without NUL"
        raise ValidationError(msg, [FieldError("name", msg)])
    content_type = request.headers.get("content-type", "") or "application/octet-stream"
    store = blobs.of(web.config, web.deps.db)
    try:
        body = await _not_empty(_within(request.stream(), web.config.body_timeout_s))
        blob = await store.write(
            body,
            tenant=tenant_of(request),
            kind="upload",
            content_type=content_type[:255],
            name=name,
            limit=limit,
        )
    except blobs.TooLarge:
        raise too_large from None
    except ClientDisconnect:
        raise InvalidBody("the client went away before the body ended") from None
    upload = Upload(blob.id, blob.name, blob.size, blob.content_type, blob.created_at)
    return MsgspecResponse(upload, status_code=201)
