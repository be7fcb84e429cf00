"""/v1/jobs and /v1/job-types: submit, show (with long-poll), result, list, and the job types."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from arq.connections import ArqRedis
from databases import Database
from starlette.requests import Request
from starlette.responses import Response
from uuid_utils.compat import uuid7

from server import limits
from server.auth import caller_of, signed_links, tenant_of
from server.body import json_body, nesting
from server.follow import Hub
from server.problems import (
    Conflict,
    FieldError,
    Gone,
    IdempotencyKeyReused,
    InvalidBody,
    JobFailed,
    JobNotDone,
    NotFound,
    UnknownJobType,
    ValidationError,
)
from server.responses import JSONResponse, MsgspecResponse
from worker import Deps, Forbidden, Job, JobType, Status, database, request_abort, resource, store
from worker.batch import Batcher
from worker.queue import enqueue_many

log = logging.getLogger("outlast.web")
MAX_WAIT_S = 60
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 16
# Idempotency-Key: 1 to 255 visible ASCII characters (a UUID, or the draft's quoted sf-string, both fit).
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")


class SubmitJob(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/jobs`. Unknown fields (`id`, `status`, `result`...) are refused by name."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    # Raw: decoded by the job type's own Input afterwards. Absent: `{}`, for types whose fields all have defaults.
    input: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    callback_url: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    timeout_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    metadata: dict[str, Any] = {}


class JobList(msgspec.Struct, frozen=True):
    items: list[Job]
    next_cursor: str | None


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    # UNSET rather than None for "not given": non-strict conversion would read the string "null" as None.
    status: Status | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    cursor: str | msgspec.UnsetType = msgspec.UNSET


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


def _decode_submit(body: bytes) -> SubmitJob:
    try:
        return _submit_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationError.from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None


def _storable(encoded: bytes, loc: str) -> bytes:
    if database.NUL.search(encoded):  # refused up front rather than failing the INSERT
        raise ValidationError(f"{database.NUL_MSG} at {loc}", [FieldError(loc, database.NUL_MSG)])
    return encoded


def _job(request: Request, row: store.JobRow) -> Job:
    return signed_links(request, resource.as_job(row))


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        msg = "Idempotency-Key must be 1 to 255 visible ASCII characters, e.g. a UUID"
        raise ValidationError(msg, [FieldError("Idempotency-Key", msg)])
    return key


def retry_after(row: store.JobRow, now: datetime | None = None) -> int:
    """How long a poller should wait: grows with the job's age, never more than 30 s."""
    age = ((now or datetime.now(UTC)) - row.created_at).total_seconds()
    return int(min(30, max(1, age // 10)))


async def submit(request: Request) -> Response:
    deps = _deps(request)
    config = deps.config
    budget: limits.Budget = request.app.state.submit_budget
    await budget.take(
        deps.redis, caller_of(request).limit_key, rate=config.submit_rate_per_s, burst=config.submit_burst
    )
    idempotency_key = _idempotency_key(request)
    raw = await json_body(
        request, config.max_body_bytes, timeout_s=config.body_timeout_s, what="a JSON object with `type` and `input`"
    )
    body = _decode_submit(raw)
    job_type = _job_types(request).get(body.type)
    if job_type is None:
        known = ", ".join(sorted(_job_types(request)))
        msg = f"unknown job type {body.type!r}; known types: {known}"
        raise UnknownJobType(msg, [FieldError("$.type", msg)])
    try:
        value = job_type.decoder.decode(body.input)
    except msgspec.ValidationError as exc:
        raise ValidationError.from_msgspec(exc, prefix="$.input") from None
    if body.callback_url is not None:
        try:  # and again at every delivery attempt, on the address actually connected to
            await request.app.state.callback_guard.check(body.callback_url)
        except Forbidden as exc:
            log.info("callback_url refused: %s", exc.detail)  # what it resolved to: for the log, not the caller
            msg = f"callback_url refused: {exc}"
            raise ValidationError(msg, [FieldError("$.callback_url", msg)]) from None
    timeout_s = body.timeout_s or min(job_type.timeout_s, config.max_timeout_s)
    if timeout_s > config.max_timeout_s:
        msg = f"timeout_s must be at most {config.max_timeout_s}"
        raise ValidationError(msg, [FieldError("$.timeout_s", msg)])
    input = _storable(_encode(value), "$.input")
    metadata = _storable(_encode(body.metadata), "$.metadata")
    if len(metadata) > MAX_METADATA_BYTES or nesting(metadata) > MAX_METADATA_DEPTH:
        msg = f"metadata must encode to at most {MAX_METADATA_BYTES} bytes of JSON, nested {MAX_METADATA_DEPTH} deep"
        raise ValidationError(msg, [FieldError("$.metadata", msg)])
    max_attempts = body.max_attempts or job_type.max_attempts or config.default_max_attempts
    # What makes two submits "the same request" for Idempotency-Key: the job they describe, not their bytes.
    canonical = [job_type.name, value, max_attempts, timeout_s, body.metadata, body.callback_url]
    fingerprint = hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).digest()

    async def insert() -> store.JobRow | None:
        job = store.NewJob(
            id=uuid7(),
            tenant=tenant_of(request),
            type=job_type.name,
            input=input,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            retry_safe=job_type.retry_safe,
            callback_url=body.callback_url,
            metadata=metadata,
            ttl_s=config.job_ttl_s,
            idempotency_key=idempotency_key,
            request_hash=fingerprint,
        )
        row: store.JobRow | None = await request.app.state.inserts(job)
        return row

    row, replayed = await _create(deps, tenant_of(request), idempotency_key, fingerprint, insert)
    headers = {"Location": f"/v1/jobs/{row.id}", "Retry-After": "1"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    # Only the request that created the row rings the doorbell: a replay never dispatches twice.
    elif not await request.app.state.enqueues((row.id, row.attempt)):
        # The row is the outbox: the sweep dispatches it once Redis is back.
        await store.undispatch(deps.db, row.id, row.attempt)
    if not replayed:
        request.app.state.metrics.submitted.labels(row.type).inc()
    return MsgspecResponse(_job(request, row), status_code=202, headers=headers)


def inserts(db: Database) -> Batcher[store.NewJob, store.JobRow | None]:
    """The web process's submits, batched (worker/batch.py): those that come while one INSERT is on its way go
    together in the next, one statement and one commit for a burst of submits, with no added wait."""

    async def insert(jobs: Sequence[store.NewJob]) -> list[store.JobRow | None]:
        return await store.insert_jobs(db, jobs)

    return Batcher(insert, shared=database.UNAVAILABLE, linger_s=0.0)


def enqueues(redis: ArqRedis) -> Batcher[tuple[UUID, int], bool]:
    """The web process's doorbells, batched as its INSERTs are: one script call rings for a burst of submits."""

    async def ring(attempts: Sequence[tuple[UUID, int]]) -> list[bool]:
        return [await enqueue_many(redis, attempts)] * len(attempts)

    # Large batches: while Redis hangs each call may take redis_timeout_s, and submits must not pile up behind it.
    return Batcher(ring, shared=(), linger_s=0.0, limit=1_000)


async def _create(
    deps: Deps,
    tenant: str,
    key: str | None,
    fingerprint: bytes,
    insert: Callable[[], Awaitable[store.JobRow | None]],
) -> tuple[store.JobRow, bool]:
    """Insert the job or, when its Idempotency-Key is taken, find the job that key made: (row, replayed).

    The unique index decides who creates (INSERT ... ON CONFLICT DO NOTHING, never check-then-insert): a concurrent
    duplicate waits for the winner's commit, then finds the winner's row here. Past `idempotency_ttl_s` a key is
    released and makes a new job."""
    for _ in range(3):
        row = await insert()
        if row is not None:
            return row, False
        assert key is not None  # nothing else can conflict
        found = await store.find_idempotent(deps.db, tenant, key, window_s=deps.config.idempotency_ttl_s)
        if found is None:
            continue  # the job was deleted meanwhile: the key is free again
        row, request_hash, expired = found
        if expired:
            await store.release_idempotency_key(deps.db, row.id, key)
            continue
        if request_hash != fingerprint:
            msg = "this Idempotency-Key was already used with a different request; use a new key for a new job"
            raise IdempotencyKeyReused(msg, [FieldError("Idempotency-Key", msg)])
        return row, True
    raise Conflict("this Idempotency-Key keeps changing hands; retry")


def _job_id(request: Request) -> UUID:
    try:
        return UUID(request.path_params["id"])
    except ValueError:
        raise NotFound("no such job") from None


async def _get(request: Request) -> store.JobRow:
    row = await store.get_job(_deps(request).db, tenant_of(request), _job_id(request))
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
    return MsgspecResponse(_job(request, row), headers=headers)


async def cancel(request: Request) -> Response:
    """Queued: cancelled at once. Running: its task is interrupted (arq abort, and the heartbeat as a fallback)
    and the job ends `cancelled`, unless it finishes first. Done: 409."""
    deps = _deps(request)
    job_id = _job_id(request)
    row = await store.request_cancel(deps.jobs, tenant_of(request), job_id)
    if row is None:
        done = await _get(request)  # 404 when unknown
        raise Conflict(f"the job is already {done.status}")
    if row.status == "running":
        await request_abort(deps.redis, row.id, row.attempt)
    return MsgspecResponse(_job(request, row), status_code=202, headers={"Location": f"/v1/jobs/{row.id}"})


async def result(request: Request) -> Response:
    row = await _get(request)
    if row.status == "succeeded":
        if row.result is None:
            raise Gone("the result was deleted after the retention period")
        return JSONResponse(row.result)
    if not row.done:
        raise JobNotDone(retry_after(row))
    raise JobFailed(row.status, resource.as_job(row).error)


def _cursor(before: UUID) -> str:
    return base64.urlsafe_b64encode(before.bytes).decode().rstrip("=")


def _parse_cursor(cursor: str) -> UUID:
    try:
        return UUID(bytes=base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        msg = "cursor is not one this server issued"
        raise ValidationError(msg, [FieldError("cursor", msg)]) from None


async def list_jobs(request: Request) -> Response:
    params = request.query_params
    for name in params:
        if len(params.getlist(name)) > 1:  # which one would count? Refuse rather than pick one silently.
            msg = f"{name} may be given once"
            raise ValidationError(msg, [FieldError(name, msg)])
    try:
        query = msgspec.convert(dict(params), ListQuery, strict=False)
    except msgspec.ValidationError as exc:
        problem = ValidationError.from_msgspec(exc)
        problem.errors = [FieldError(e.loc.removeprefix("$."), e.msg) for e in problem.errors]
        raise problem from None
    if query.type is not msgspec.UNSET and "\x00" in query.type:
        raise ValidationError(database.NUL_MSG, [FieldError("type", database.NUL_MSG)])
    before = None if query.cursor is msgspec.UNSET else _parse_cursor(query.cursor)
    rows = await store.list_jobs(
        _deps(request).db,
        tenant_of(request),
        limit=query.limit + 1,
        status=None if query.status is msgspec.UNSET else query.status,
        type=None if query.type is msgspec.UNSET else query.type,
        before=before,
    )
    page = rows[: query.limit]
    next_cursor = _cursor(page[-1].id) if len(rows) > query.limit else None
    return MsgspecResponse(JobList([_job(request, row) for row in page], next_cursor))


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
