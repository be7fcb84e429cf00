"""/v1/jobs and /v1/job-types: show (with long-poll), result, cancel, list, the job types. Submit: server/submit.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, TypeVar
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server import b64
from server import blobs as blob_answer
from server.auth import signed_links, tenant_of
from server.problems import (
    Conflict,
    FieldError,
    Gone,
    JobFailed,
    JobNotDone,
    NotFound,
    ValidationError,
)
from server.responses import JSONResponse, MsgspecResponse
from server.state import web_of
from worker import Job, JobType, Status, blobs, control, database, resource, store
from worker.job_types import JobTypeInfo, describe

MAX_WAIT_S = 60


class JobList(msgspec.Struct, frozen=True):
    items: list[Job]
    next_cursor: str | None


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    # UNSET rather than None for "not given": non-strict conversion would read the string "null" as None.
    status: Status | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: str | msgspec.UnsetType = msgspec.UNSET


class JobTypeList(msgspec.Struct, frozen=True):
    items: list[JobTypeInfo]


def present(request: Request, row: store.JobRow) -> Job:
    """The Job as this caller sees it: its links carry a read token (server/auth.py)."""
    return signed_links(request, resource.as_job(row))


def retry_after(row: store.JobRow, now: datetime | None = None) -> int:
    """How long a poller should wait: grows with the job's age, never more than 30 s."""
    age = ((now or datetime.now(UTC)) - row.created_at).total_seconds()
    return int(min(30, max(1, age // 10)))


def _job_id(request: Request) -> UUID:
    try:
        return UUID(request.path_params["id"])
    except ValueError:
        raise NotFound("no such job") from None


async def job_or_404(request: Request) -> store.JobRow:
    """The job the path names, of the caller's tenant; else 404, exactly as for an id that never existed."""
    row = await store.get_job(web_of(request).deps.db, tenant_of(request), _job_id(request))
    if row is None:
        raise NotFound("no such job")
    return row


def wait_preference(request: Request) -> int:
    """`Prefer: wait=N` (RFC 7240), capped; anything unparsable is ignored, as preferences may be."""
    for pref in request.headers.get("prefer", "").split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(int(value.strip()), MAX_WAIT_S)
    return 0


async def until_done(request: Request, row: store.JobRow, wait_s: int) -> store.JobRow:
    """The job once it is done, or as it is after `wait_s` seconds: woken by the job's own events (the
    notification streams get), not by a polling loop."""
    if row.done or not wait_s:
        return row
    web = web_of(request)
    until = asyncio.get_running_loop().time() + wait_s
    with web.hub.follow(row.id) as follower:
        while True:
            follower.clear()
            found = await store.get_job(web.deps.db, tenant_of(request), row.id)
            if found is None:  # deleted meanwhile (retention): show it as last seen
                return row
            row = found
            if row.done or not await follower.wait(until):
                return row


async def show(request: Request) -> Response:
    wait = wait_preference(request)
    row = await until_done(request, await job_or_404(request), wait)
    headers = {} if row.done else {"Retry-After": str(retry_after(row))}
    if wait:
        headers["Preference-Applied"] = f"wait={wait}"
    return MsgspecResponse(present(request, row), headers=headers)


async def cancel(request: Request) -> Response:
    """worker/control.py's cancel; a job already done: 409."""
    row = await control.cancel(web_of(request).deps, tenant_of(request), _job_id(request))
    if row is None:
        done = await job_or_404(request)  # 404 when unknown
        raise Conflict(f"the job is already {done.status}")
    return MsgspecResponse(present(request, row), status_code=202, headers={"Location": f"/v1/jobs/{row.id}"})


async def result(request: Request) -> Response:
    """The result; one kept in the blob store streams, with Range. `?file=name`: a file the job wrote (ctx.output)."""
    row = await job_or_404(request)
    web = web_of(request)
    if "file" in request.query_params:
        store = blobs.of(web.config, web.deps.db)
        blob = await store.of_job(row.id, row.attempt, "output", request.query_params["file"])
        if blob is None:
            raise NotFound("this job wrote no file of that name")
        return blob_answer.stream(request, store, blob, attachment=True)
    if row.status == "succeeded":
        if row.result_size is not None and row.result_purged_at is None:
            store = blobs.of(web.config, web.deps.db)
            if (blob := await store.of_job(row.id, row.attempt, "result")) is not None:
                return blob_answer.stream(request, store, blob)
        if row.result is None:
            raise Gone("the result was deleted after the retention period")
        return JSONResponse(row.result)
    if not row.done:
        raise JobNotDone(retry_after(row))
    raise JobFailed(row.status, resource.as_job(row).error)


def _cursor(before: UUID) -> str:
    return b64.encode(before.bytes)


def _parse_cursor(cursor: str) -> UUID:
    try:
        return UUID(bytes=b64.decode(cursor))
    except ValueError:
        msg = "cursor is not one this server issued"
        raise ValidationError(msg, [FieldError("cursor", msg)]) from None


Q = TypeVar("Q")


def decode_query(params: Mapping[str, str], type: type[Q]) -> Q:
    """A query string as `type`, or a 422 naming each parameter that is wrong (by its name, not a JSON path)."""
    try:
        return msgspec.convert(dict(params), type, strict=False)
    except msgspec.ValidationError as exc:
        problem = ValidationError.from_msgspec(exc)
        problem.errors = [FieldError(e.loc.removeprefix("$."), e.msg) for e in problem.errors]
        raise problem from None


async def list_jobs(request: Request) -> Response:
    params = request.query_params
    for name in params:
        if len(params.getlist(name)) > 1:  # which one would count? Refuse rather than pick one silently.
            msg = f"{name} may be given once"
            raise ValidationError(msg, [FieldError(name, msg)])
    query = decode_query(params, ListQuery)
    if query.type is not msgspec.UNSET and "\x00" in query.type:
        raise ValidationError(database.NUL_MSG, [FieldError("type", database.NUL_MSG)])
    before = None if query.cursor is msgspec.UNSET else _parse_cursor(query.cursor)
    rows = await store.list_jobs(
        web_of(request).deps.db,
        tenant_of(request),
        limit=query.limit + 1,
        status=None if query.status is msgspec.UNSET else query.status,
        type=None if query.type is msgspec.UNSET else query.type,
        before=before,
    )
    page = rows[: query.limit]
    next_cursor = _cursor(page[-1].id) if len(rows) > query.limit else None
    return MsgspecResponse(JobList([present(request, row) for row in page], next_cursor))


def job_type_list(types: Mapping[str, JobType], default_max_attempts: int) -> JobTypeList:
    return JobTypeList(describe(types, default_max_attempts))


async def job_types(request: Request) -> Response:
    return MsgspecResponse(web_of(request).job_type_list)
