"""POST /v1/jobs/cancel: cancel the tenant's jobs that match a filter, at most 10,000 a call (worker/bulk.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.auth import tenant_of
from server.body import json_body
from server.problems import FieldError, ValidationError
from server.responses import MsgspecResponse
from server.state import web_of
from server.submit import decode
from worker import database
from worker.bulk import MAX_CANCEL, cancel_matching


class CancelFilter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/jobs/cancel`: every filter given must match; none given, every live job."""

    status: Literal["queued", "running"] | None = None  # an ended job can't be cancelled
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    metadata: dict[str, Any] = {}  # contained in the job's: {"customer": "acme"} matches any job with that key


class Cancelled(msgspec.Struct, frozen=True):
    cancelled: int  # queued jobs ended, and running ones asked to stop; MAX_CANCEL: there may be more


_decoder = msgspec.json.Decoder(CancelFilter)
_encode = msgspec.json.Encoder().encode


async def cancel_many(request: Request) -> Response:
    """Queued jobs end `cancelled` at once; running ones are asked to stop, as a single cancel asks them."""
    web = web_of(request)
    config = web.config
    body = await json_body(
        request, config.max_body_bytes, timeout_s=config.body_timeout_s, what='a JSON object such as {"type": "…"}'
    )
    wanted: CancelFilter = decode(body, _decoder)
    metadata = _encode(wanted.metadata)
    for loc, text in (("$.type", (wanted.type or "").encode()), ("$.metadata", metadata)):
        if b"\x00" in text or database.has_nul(text):  # no stored job can hold one, and no statement can carry it
            raise ValidationError(f"{database.NUL_MSG} at {loc}", [FieldError(loc, database.NUL_MSG)])
    n = await cancel_matching(
        web.deps.jobs,
        web.deps.redis,
        tenant_of(request),
        status=wanted.status,
        type=wanted.type,
        metadata=metadata,
        limit=MAX_CANCEL,
    )
    return MsgspecResponse(Cancelled(n), status_code=202)
