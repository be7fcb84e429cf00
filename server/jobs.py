"""/v1/jobs and /v1/job-types: submit, show (with long-poll), result, list, and the job types."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from uuid_utils.compat import uuid7

from server.problems import (
    FieldError,
    Gone,
    InvalidBody,
    JobFailed,
    JobNotDone,
    NotFound,
    PayloadTooLarge,
    UnknownJobType,
    ValidationError,
)
from server.responses import MsgspecResponse
from worker import Deps, Hub, Job, JobType, Status, enqueue, store

TENANT = "default"  # one tenant until API keys land
MAX_WAIT_S = 60
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 16
TOO_DEEP = "the JSON is nested too deeply"


class SubmitJob(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/jobs`. Unknown fields (`id`, `status`, `result`...) are refused by name."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    # Raw: decoded by the job type's own Input afterwards. Absent: `{}`, for types whose fields all have defaults.
    input: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    callback_url: str | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    timeout_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    metadata: dict[str, Any] = {}


class JobList(msgspec.Struct, frozen=True):
    items: list[Job]
    next_cursor: str | None


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    status: Status | None = None
    type: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: str | None = None


class JobTypeInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    retry_safe: bool
    timeout_s: int
    max_attempts: int
    input_schema: dict[str, Any]


class JobTypeList(msgspec.Struct, frozen=True):
    items: list[JobTypeInfo]


_submit_decoder = msgspec.json.Decoder(SubmitJob)
_encode = msgspec.json.Encoder().encode


def _deps(request: Request) -> Deps:
    deps: Deps = request.app.state.deps
    return deps


def _job_types(request: Request) -> Mapping[str, JobType]:
    types: Mapping[str, JobType] = request.app.state.job_types
    return types


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit`, whatever Content-Length claimed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body passed the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_submit(body: bytes) -> SubmitJob:
    if not body.strip():
        raise InvalidBody("the body is empty; send a JSON object with `type` and `input`")
    try:
        return _submit_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationError.from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidBody(TOO_DEEP) from None


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def retry_after(row: store.JobRow, now: datetime | None = None) -> int:
    """How long a poller should wait: grows with the job's age, never more than 30 s."""
    age = ((now or datetime.now(UTC)) - row.created_at).total_seconds()
    return int(min(30, max(1, age // 10)))


async def submit(request: Request) -> Response:
    deps = _deps(request)
    config = deps.config
    body = _decode_submit(await read_body(request, config.max_body_bytes))
    job_type = _job_types(request).get(body.type)
    if job_type is None:
        known = ", ".join(sorted(_job_types(request)))
        msg = f"unknown job type {body.type!r}; known types: {known}"
        raise UnknownJobType(msg, [FieldError("$.type", msg)])
    try:
        value = job_type.decoder.decode(body.input)
    except msgspec.ValidationError as exc:
        raise ValidationError.from_msgspec(exc, prefix="$.input") from None
    except RecursionError:
        raise InvalidBody(TOO_DEEP) from None
    if body.callback_url is not None:
        msg = "webhook delivery is not available in this version; poll the job or use `Prefer: wait=N`"
        raise ValidationError(msg, [FieldError("$.callback_url", msg)])
    timeout_s = body.timeout_s or min(job_type.timeout_s, config.max_timeout_s)
    if timeout_s > config.max_timeout_s:
        msg = f"timeout_s must be at most {config.max_timeout_s}"
        raise ValidationError(msg, [FieldError("$.timeout_s", msg)])
    metadata = _encode(body.metadata)
    if len(metadata) > MAX_METADATA_BYTES or _depth(body.metadata) > MAX_METADATA_DEPTH:
        msg = f"metadata must encode to at most {MAX_METADATA_BYTES} bytes of JSON, nested {MAX_METADATA_DEPTH} deep"
        raise ValidationError(msg, [FieldError("$.metadata", msg)])
    row = await store.insert_job(
        deps.db,
        job_id=uuid7(),
        tenant=TENANT,
        type=job_type.name,
        input=_encode(value),
        max_attempts=body.max_attempts or job_type.max_attempts or config.default_max_attempts,
        timeout_s=timeout_s,
        retry_safe=job_type.retry_safe,
        callback_url=None,
        metadata=metadata,
        ttl_s=config.job_ttl_s,
    )
    if not await enqueue(deps.redis, row.id, row.attempt):
        # The row is the outbox: the sweep dispatches it once Redis is back.
        await store.undispatch(deps.db, row.id, row.attempt)
    request.app.state.metrics.submitted.labels(row.type).inc()
    headers = {"Location": f"/v1/jobs/{row.id}", "Retry-After": "1"}
    return MsgspecResponse(row.to_job(), status_code=202, headers=headers)


def _job_id(request: Request) -> UUID:
    try:
        return UUID(request.path_params["id"])
    except ValueError:
        raise NotFound("no such job") from None


async def _get(request: Request) -> store.JobRow:
    row = await store.get_job(_deps(request).db, TENANT, _job_id(request))
    if row is None:
        raise NotFound("no such job")
    return row


def _wait_preference(request: Request) -> int:
    """`Prefer: wait=N` (RFC 7240), capped; anything unparsable is ignored, as preferences may be."""
    for pref in request.headers.get("prefer", "").split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(int(value.strip()), MAX_WAIT_S)
    return 0


async def show(request: Request) -> Response:
    row = await _get(request)
    wait = _wait_preference(request)
    if wait and not row.done:
        # Woken by the job's own events (the same notification streams get), not by a polling loop.
        until = asyncio.get_running_loop().time() + wait
        hub: Hub = request.app.state.hub
        with hub.follow(row.id) as follower:
            while True:
                follower.clear()
                row = await _get(request)
                if row.done or not await follower.wait(until):
                    break
    headers = {} if row.done else {"Retry-After": str(retry_after(row))}
    if wait:
        headers["Preference-Applied"] = f"wait={wait}"
    return MsgspecResponse(row.to_job(), headers=headers)


async def result(request: Request) -> Response:
    row = await _get(request)
    if row.status == "succeeded":
        if row.result is None:
            raise Gone("the result was deleted after the retention period")
        return Response(row.result, media_type="application/json")
    if not row.done:
        raise JobNotDone(retry_after(row))
    raise JobFailed(row.status, row.to_job().error)


def _cursor(before: UUID) -> str:
    return base64.urlsafe_b64encode(before.bytes).decode().rstrip("=")


def _parse_cursor(cursor: str) -> UUID:
    try:
        return UUID(bytes=base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        msg = "cursor is not one this server issued"
        raise ValidationError(msg, [FieldError("cursor", msg)]) from None


async def list_jobs(request: Request) -> Response:
    try:
        query = msgspec.convert(dict(request.query_params), ListQuery, strict=False)
    except msgspec.ValidationError as exc:
        problem = ValidationError.from_msgspec(exc)
        problem.errors = [FieldError(e.loc.removeprefix("$."), e.msg) for e in problem.errors]
        raise problem from None
    before = None if query.cursor is None else _parse_cursor(query.cursor)
    rows = await store.list_jobs(
        _deps(request).db, TENANT, limit=query.limit + 1, status=query.status, type=query.type, before=before
    )
    page = rows[: query.limit]
    next_cursor = _cursor(page[-1].id) if len(rows) > query.limit else None
    return MsgspecResponse(JobList([row.to_job() for row in page], next_cursor))


def job_type_list(types: Mapping[str, JobType], default_max_attempts: int) -> JobTypeList:
    return JobTypeList(
        [
            JobTypeInfo(
                name=t.name,
                description=t.description,
                retry_safe=t.retry_safe,
                timeout_s=t.timeout_s,
                max_attempts=t.max_attempts or default_max_attempts,
                input_schema=msgspec.json.schema(t.input),
            )
            for t in types.values()
        ]
    )


async def job_types(request: Request) -> Response:
    return MsgspecResponse(request.app.state.job_type_list)
