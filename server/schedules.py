"""/v1/schedules: the tenant's cron schedules (list, create, show, change, delete) and trigger-now. The engine's side
is worker/schedules.py (the table) and worker/ticker.py (ticks and triggers).

A schedule's type, input and metadata are checked exactly as a submit's are (server/submit.py's new_job), and its cron
expression and time zone by worker/cron.py: each bad field is a 422 naming it. A schedule declared in a job module's
SCHEDULES may be paused, resumed and triggered here; its definition is the code's (409 otherwise).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from uuid_utils.compat import uuid7

from server import b64
from server.auth import caller_of, tenant_of
from server.body import json_body
from server.jobs import decode_query, present
from server.problems import Conflict, FieldError, NotFound, UnknownJobType, ValidationError
from server.responses import MsgspecResponse
from server.state import Web, web_of
from server.submit import SubmitJob, decode, new_job
from worker import cron, schedules, ticker

Id = Annotated[str, msgspec.Meta(pattern=f"^{schedules.ID_PATTERN}$")]
Cron = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
TimeZone = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
TypeName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class NewSchedule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/schedules`."""

    id: Id | None = None  # absent: one is made
    cron: Cron
    timezone: TimeZone = "UTC"
    type: TypeName
    input: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    metadata: dict[str, Any] = {}
    paused: bool = False


class ScheduleChange(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `PATCH /v1/schedules/{id}`: the fields to change."""

    cron: Cron | msgspec.UnsetType = msgspec.UNSET
    timezone: TimeZone | msgspec.UnsetType = msgspec.UNSET
    type: TypeName | msgspec.UnsetType = msgspec.UNSET
    input: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    paused: bool | msgspec.UnsetType = msgspec.UNSET


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: str | msgspec.UnsetType = msgspec.UNSET


class ScheduleList(msgspec.Struct, frozen=True):
    items: list[schedules.ScheduleResource]
    next_cursor: str | None


_new_decoder = msgspec.json.Decoder(NewSchedule)
_change_decoder = msgspec.json.Decoder(ScheduleChange)


async def _definition(
    web: Web, tenant: str, schedule_id: str, *, cron_text: str, timezone: str, body: SubmitJob
) -> schedules.Definition:
    """The schedule checked: its cron and time zone, then its type, input and metadata as a submit's."""
    try:
        parsed = cron.Cron.parse(cron_text, timezone)
    except cron.CronError as exc:
        raise ValidationError(f"{exc} (at $.{exc.field})", [FieldError(f"$.{exc.field}", str(exc))]) from None
    job = await new_job(web, tenant, body, None)
    return schedules.Definition(
        tenant=tenant, id=schedule_id, cron=parsed, type=job.type, input=job.input, metadata=job.metadata
    )


def _present(row: schedules.ScheduleRow) -> MsgspecResponse:
    return MsgspecResponse(schedules.as_resource(row))


def _schedule_id(request: Request) -> str:
    schedule_id = str(request.path_params["id"])
    if not re.fullmatch(schedules.ID_PATTERN, schedule_id):  # no such id can exist (nor reach the database)
        raise NotFound("no such schedule")
    return schedule_id


async def _schedule_or_404(request: Request) -> schedules.ScheduleRow:
    row = await schedules.get(web_of(request).deps.db, tenant_of(request), _schedule_id(request))
    if row is None:
        raise NotFound("no such schedule")
    return row


async def _body(request: Request, what: str) -> bytes:
    config = web_of(request).config
    return await json_body(request, config.max_body_bytes, timeout_s=config.body_timeout_s, what=what)


async def create(request: Request) -> Response:
    web, tenant = web_of(request), tenant_of(request)
    body: NewSchedule = decode(await _body(request, "a JSON object with `cron` and `type`"), _new_decoder)
    schedule_id = body.id or str(uuid7())
    job = SubmitJob(type=body.type, input=body.input, metadata=body.metadata)
    definition = await _definition(web, tenant, schedule_id, cron_text=body.cron, timezone=body.timezone, body=job)
    row = await schedules.create(web.deps.db, definition, paused=body.paused)
    if row is None:
        msg = f"a schedule {schedule_id!r} exists already; change it with PATCH, or choose another id"
        raise Conflict(msg, [FieldError("$.id", msg)])
    return MsgspecResponse(schedules.as_resource(row), status_code=201, headers={"Location": f"/v1/schedules/{row.id}"})


async def show(request: Request) -> Response:
    return _present(await _schedule_or_404(request))


async def change(request: Request) -> Response:
    """Change the given fields; a new cron or time zone, or a resume, books the first tick from now."""
    web, tenant = web_of(request), tenant_of(request)
    body: ScheduleChange = decode(await _body(request, "a JSON object of the fields to change"), _change_decoder)
    row = await _schedule_or_404(request)
    given = [f for f in ("cron", "timezone", "type", "input", "metadata") if getattr(body, f) is not msgspec.UNSET]
    if row.declared and given:
        msg = "this schedule is declared in a job module's SCHEDULES: change it there (only `paused` may change here)"
        raise Conflict(msg, [FieldError(f"$.{given[0]}", msg)])
    job = SubmitJob(
        type=row.type if body.type is msgspec.UNSET else body.type,
        input=msgspec.Raw(row.input.encode()) if body.input is msgspec.UNSET else body.input,
        metadata=msgspec.json.decode(row.metadata) if body.metadata is msgspec.UNSET else body.metadata,
    )
    definition = await _definition(
        web,
        tenant,
        row.id,
        cron_text=row.cron if body.cron is msgspec.UNSET else body.cron,
        timezone=row.timezone if body.timezone is msgspec.UNSET else body.timezone,
        body=job,
    )
    paused = row.paused if body.paused is msgspec.UNSET else body.paused
    changed = await schedules.redefine(web.deps.db, definition, paused=paused)
    if changed is None:  # deleted meanwhile
        raise NotFound("no such schedule")
    return _present(changed)


async def delete(request: Request) -> Response:
    if not await schedules.delete(web_of(request).deps.db, tenant_of(request), _schedule_id(request)):
        row = await _schedule_or_404(request)
        assert row.declared
        raise Conflict("this schedule is declared in a job module's SCHEDULES: remove it there")
    return Response(status_code=204)


async def trigger(request: Request) -> Response:
    """A job of the schedule now, whatever its next tick (which stays) and even while paused."""
    web = web_of(request)
    await web.submits.take(  # it makes a job: it counts as a submit does
        web.deps.redis, caller_of(request).limit_key, rate=web.config.submit_rate_per_s, burst=web.config.submit_burst
    )
    try:
        made = await ticker.trigger(web.deps, web.job_types, tenant_of(request), _schedule_id(request))
    except LookupError as exc:
        msg = f"no job type {exc.args[0]!r} is registered any more; change the schedule's type"
        raise UnknownJobType(msg, [FieldError("type", msg)]) from None
    if made is None:
        raise NotFound("no such schedule")
    _, job = made
    web.metrics.submitted.labels(job.type).inc()
    return MsgspecResponse(present(request, job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


async def list_schedules(request: Request) -> Response:
    params = request.query_params
    query = decode_query(params, ListQuery)
    after = ""
    if query.cursor is not msgspec.UNSET:
        try:
            after = b64.decode(query.cursor).decode()
        except ValueError:
            msg = "cursor is not one this server issued"
            raise ValidationError(msg, [FieldError("cursor", msg)]) from None
    web = web_of(request)
    rows = await schedules.list_schedules(web.deps.db, tenant_of(request), limit=query.limit + 1, after=after)
    page = rows[: query.limit]
    next_cursor = b64.encode(page[-1].id.encode()) if len(rows) > query.limit else None
    return MsgspecResponse(ScheduleList([schedules.as_resource(row) for row in page], next_cursor))
