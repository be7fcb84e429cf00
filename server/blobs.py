"""A blob (worker/blobs.py) as an HTTP answer: streamed a chunk at a time with its content type and length, and a
single `Range` (RFC 9110 §14) answered 206 with its part, or 416 when it starts past the end."""

from __future__ import annotations

import re
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.problems import RangeNotSatisfiable
from worker.blobs import Blob, Blobs

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def wanted(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range [start, end) a `Range` header asks of `size` bytes; None for the whole content: no header,
    one this server does not take (another unit, several ranges, garbage), which RFC 9110 lets it ignore.
    RangeNotSatisfiable for a range that starts at or past the end."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match[1] == match[2] == "":
        return None
    first, last = match[1], match[2]
    if first == "":  # the last N bytes
        if int(last) == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - int(last)), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # invalid, hence ignored (§14.1.1)
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, end


def stream(request: Request, store: Blobs, blob: Blob, *, attachment: bool = False) -> Response:
    """The blob, or the part of it the request's Range asks for. A request with If-Range gets it whole: this server
    keeps no validator it could compare."""
    part = None if "if-range" in request.headers else wanted(request.headers.get("range"), blob.size)
    start, end = part or (0, blob.size)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start)}
    if part is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
    if attachment:
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(blob.name, safe='')}"
    return StreamingResponse(
        store.read(blob, start, end),
        status_code=206 if part is not None else 200,
        headers=headers,
        media_type=blob.content_type,
    )
