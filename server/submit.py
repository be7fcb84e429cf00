"""Making jobs: POST /v1/jobs, /v1/jobs/batch and /v1/jobs/{id}/retry. A submit body is made into the job to insert
(validation, limits, its fingerprint), created once per Idempotency-Key, and its doorbell rung. Submits that come
together share one INSERT and one doorbell; a batch is one transaction."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import msgspec
from arq.connections import ArqRedis
from databases import Database
from starlette.requests import Request
from starlette.responses import Response
from uuid_utils.compat import uuid7

from server.auth import caller_of, tenant_of
from server.body import json_body, nesting
from server.jobs import job_or_404, present, until_done, wait_preference
from server.problems import Conflict, FieldError, IdempotencyKeyReused, InvalidBody, UnknownJobType, ValidationError
from server.responses import MsgspecResponse
from server.state import Web, web_of
from worker import Forbidden, Job, control, database, store, tracing, workflows
from worker.batch import Batcher
from worker.queue import Bell, enqueue_many

log = logging.getLogger("outlast.web")
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 16
# Idempotency-Key: 1 to 255 visible ASCII characters (a UUID, or the draft's quoted sf-string, both fit).
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
MAX_DELAY_S = 31_536_000  # a year: run_at and delay_s reach no further
# A batch is inserted this many jobs at a time, so that the web process works on the next while PostgreSQL writes one
BATCH_CHUNK_JOBS = 250
T = TypeVar("T")


class SubmitJob(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/jobs`. Unknown fields (`id`, `status`, `result`...) are refused by name."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    # Raw: decoded by the job type's own Input afterwards. Absent: `{}`, for types whose fields all have defaults.
    input: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    callback_url: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    timeout_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    metadata: dict[str, Any] = {}
    run_at: datetime | None = None  # RFC 3339 with an offset; not started before then
    delay_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_DELAY_S)] | None = None  # or: not before this many s from now
    priority: Annotated[int, msgspec.Meta(ge=-10, le=10)] = 0
    concurrency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class BatchItem(SubmitJob, forbid_unknown_fields=True, kw_only=True):
    """A job of `POST /v1/jobs/batch`, with its own Idempotency-Key."""

    idempotency_key: Annotated[str, msgspec.Meta(pattern=r"^[!-~]{1,255}$")] | None = None


class SubmitBatch(msgspec.Struct, forbid_unknown_fields=True):
    jobs: Annotated[list[BatchItem], msgspec.Meta(min_length=1)]


class JobItems(msgspec.Struct, frozen=True):
    items: list[Job]


_decoder = msgspec.json.Decoder(SubmitJob)
_batch_decoder = msgspec.json.Decoder(SubmitBatch)
_encode = msgspec.json.Encoder().encode


async def submit(request: Request) -> Response:
    web = web_of(request)
    config = web.config
    await web.submits.take(
        web.deps.redis, caller_of(request).limit_key, rate=config.submit_rate_per_s, burst=config.submit_burst
    )
    key = idempotency_key(request)
    body = await json_body(
        request, config.max_body_bytes, timeout_s=config.body_timeout_s, what="a JSON object with `type` and `input`"
    )
    job = await new_job(web, tenant_of(request), decode(body), key)
    row, replayed = await create(web, job)
    headers = {"Location": f"/v1/jobs/{row.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    else:  # only the request that created the row rings the doorbell: a replay never dispatches twice
        if not await web.enqueues(bell(job, row)):
            await store.undispatch(web.deps.db, row.id, row.attempt)  # the row is the outbox: the sweep rings
        web.metrics.submitted.labels(row.type).inc()
    # Prefer: wait=N: a short job's answer in one round trip; a longer one gets the usual 202.
    wait = wait_preference(request)
    row = await until_done(request, row, wait)
    if row.done and wait:
        return MsgspecResponse(present(request, row), headers={**headers, "Preference-Applied": f"wait={wait}"})
    return MsgspecResponse(present(request, row), status_code=202, headers={**headers, "Retry-After": "1"})


def decode(body: bytes, decoder: msgspec.json.Decoder[Any] = _decoder) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationError.from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        msg = "Idempotency-Key must be 1 to 255 visible ASCII characters, e.g. a UUID"
        raise ValidationError(msg, [FieldError("Idempotency-Key", msg)])
    return key


async def new_job(web: Web, tenant: str, body: SubmitJob, key: str | None, *, at: str = "$") -> store.NewJob:
    """The job `body` asks for, checked against its type's schema and the deployment's limits, or a 422 naming the
    field: `make_job`, once its callback_url has passed `check_callback`."""
    job = make_job(web, tenant, body, key, at=at)
    if body.callback_url is not None:
        await check_callback(web, body.callback_url, at)
    return job


async def check_callback(web: Web, url: str, at: str) -> None:
    """The SSRF guard at submit, or a 422 naming the field; and again at every delivery attempt, on the address
    actually connected to."""
    try:
        await web.callbacks.check(url)
    except Forbidden as exc:
        log.info("callback_url refused: %s", exc.detail)  # what it resolved to: for the log, not the caller
        msg = f"callback_url refused: {exc}"
        raise ValidationError(msg, [FieldError(f"{at}.callback_url", msg)]) from None


def make_job(web: Web, tenant: str, body: SubmitJob, key: str | None, *, at: str = "$") -> store.NewJob:
    """`new_job` but for the callback_url's check, which waits on DNS. Its fingerprint (`request_hash`) is what
    makes two submits "the same request" for an Idempotency-Key: the job they describe, not their bytes."""
    config = web.config
    job_type = web.job_types.get(body.type)
    if job_type is None:
        msg = f"unknown job type {body.type!r}; known types: {', '.join(sorted(web.job_types))}"
        raise UnknownJobType(msg, [FieldError(f"{at}.type", msg)])
    try:
        value = job_type.decoder.decode(body.input)
    except msgspec.ValidationError as exc:
        raise ValidationError.from_msgspec(exc, prefix=f"{at}.input") from None
    timeout_s = body.timeout_s or min(job_type.timeout_s, config.max_timeout_s)
    if timeout_s > config.max_timeout_s:
        msg = f"timeout_s must be at most {config.max_timeout_s}"
        raise ValidationError(msg, [FieldError(f"{at}.timeout_s", msg)])
    input = _storable(_encode(value), f"{at}.input")
    metadata = _storable(_encode(body.metadata), f"{at}.metadata")
    # no text nests deeper than it has opening brackets: the exact count only for metadata that might
    too_deep = (
        metadata.count(b"{") + metadata.count(b"[") > MAX_METADATA_DEPTH and nesting(metadata) > MAX_METADATA_DEPTH
    )
    if len(metadata) > MAX_METADATA_BYTES or too_deep:
        msg = f"metadata must encode to at most {MAX_METADATA_BYTES} bytes of JSON, nested {MAX_METADATA_DEPTH} deep"
        raise ValidationError(msg, [FieldError(f"{at}.metadata", msg)])
    max_attempts = body.max_attempts or job_type.max_attempts or config.default_max_attempts
    run_at = _start_at(body, at)
    if body.concurrency_key is not None and job_type.concurrency is None:
        msg = f"job type {job_type.name!r} declares no concurrency limit, so it takes no concurrency_key"
        raise ValidationError(msg, [FieldError(f"{at}.concurrency_key", msg)])
    canonical = [job_type.name, value, max_attempts, timeout_s, body.metadata, body.callback_url]
    if run_at is not None or body.priority or body.concurrency_key is not None:  # older fingerprints stay valid
        # delay_s is fingerprinted as asked, not as a time: the same request sent again is the same request
        canonical += [body.run_at, body.delay_s, body.priority, body.concurrency_key]
    return store.NewJob(
        id=uuid7(),
        tenant=tenant,
        type=job_type.name,
        input=input,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        retry_safe=job_type.retry_safe,
        callback_url=body.callback_url,
        metadata=metadata,
        ttl_s=config.job_ttl_s,
        idempotency_key=key,
        request_hash=hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).digest(),
        run_at=run_at,
        priority=body.priority,
        concurrency_key=body.concurrency_key,
        traceparent=tracing.traceparent(),  # the submit span's (server/tracing.py)
    )


def _start_at(body: SubmitJob, at: str) -> datetime | None:
    """When the job may start: `run_at`, or `delay_s` from now; None: now."""
    if body.run_at is not None and body.delay_s is not None:
        msg = "give run_at or delay_s, not both"
        raise ValidationError(msg, [FieldError(f"{at}.run_at", msg), FieldError(f"{at}.delay_s", msg)])
    if body.delay_s is not None:
        return datetime.now(UTC) + timedelta(seconds=body.delay_s)
    if body.run_at is None:
        return None
    if body.run_at.tzinfo is None:
        msg = "run_at must be an RFC 3339 time with an offset, e.g. 2026-12-24T18:00:00Z"
        raise ValidationError(msg, [FieldError(f"{at}.run_at", msg)])
    if body.run_at > datetime.now(UTC) + timedelta(seconds=MAX_DELAY_S):
        msg = "run_at must be within a year from now"
        raise ValidationError(msg, [FieldError(f"{at}.run_at", msg)])
    return body.run_at  # a time already past runs now


def bell(job: store.NewJob, row: store.JobRow) -> Bell:
    """The doorbell for a new job: ranked by its priority and fairly among tenants, or delayed to its run_at."""
    delay_s = 0.0 if job.run_at is None else (job.run_at - datetime.now(UTC)).total_seconds()
    return Bell(row.id, row.attempt, job.priority, job.tenant, max(0.0, delay_s))


def _storable(encoded: bytes, loc: str) -> bytes:
    if database.has_nul(encoded):  # refused up front rather than failing the INSERT
        raise ValidationError(f"{database.NUL_MSG} at {loc}", [FieldError(loc, database.NUL_MSG)])
    return encoded


async def submit_batch(request: Request) -> Response:
    """Up to OUTLAST_MAX_BATCH_JOBS jobs in one transaction: all are created, or (one bad item: 422 naming it as
    `$.jobs[17]…`) none. Each item may carry its own `idempotency_key`; one doorbell call rings for them all."""
    web = web_of(request)
    config = web.config
    body = await json_body(
        request, config.max_body_bytes, timeout_s=config.body_timeout_s, what='a JSON object `{"jobs": [...]}`'
    )
    batch: SubmitBatch = decode(body, _batch_decoder)
    if len(batch.jobs) > config.max_batch_jobs:
        msg = f"a batch holds at most {config.max_batch_jobs} jobs, not {len(batch.jobs)}"
        raise ValidationError(msg, [FieldError("$.jobs", msg)])
    await web.submits.take(  # one request, one token: a batch's size is capped by max_batch_jobs instead
        web.deps.redis, caller_of(request).limit_key, rate=config.submit_rate_per_s, burst=config.submit_burst
    )
    tenant = tenant_of(request)
    await _check_callbacks(web, batch.jobs)
    made = [
        functools.partial(_make_jobs, web, tenant, batch.jobs, start)
        for start in range(0, len(batch.jobs), BATCH_CHUNK_JOBS)
    ]
    created, items = await create_all(web, made, lambda rows: [present(request, row) for row, _ in rows])
    fresh = [bell(job, row) for job, row, replayed in created if not replayed]
    ringing = asyncio.ensure_future(enqueue_many(web.deps.redis, fresh, step_s=config.priority_step_s))
    answer = MsgspecResponse(JobItems(items), status_code=202)  # encoded while Redis runs the doorbell script
    if not await ringing:  # the rows are the outbox: the sweep rings
        await store.undispatch_many(web.deps.db, [(b.job_id, b.started) for b in fresh])
    for _, row, replayed in created:
        if not replayed:
            web.metrics.submitted.labels(row.type).inc()
    return answer


async def _check_callbacks(web: Web, items: list[BatchItem]) -> None:
    """`check_callback` for each callback_url of a batch, once per URL and all at once: a thousand jobs reporting to
    one receiver resolve it once, and a batch's slow resolvers cost the slowest one's time, not their sum."""
    first_use: dict[str, int] = {}
    for n, item in enumerate(items):
        if item.callback_url is not None:
            first_use.setdefault(item.callback_url, n)
    checks = [check_callback(web, url, f"$.jobs[{n}]") for url, n in first_use.items()]
    for outcome in await asyncio.gather(*checks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome  # the refusal of the first item refused


def _make_jobs(web: Web, tenant: str, items: list[BatchItem], start: int) -> list[store.NewJob]:
    chunk = items[start : start + BATCH_CHUNK_JOBS]
    return [make_job(web, tenant, item, item.idempotency_key, at=f"$.jobs[{n}]") for n, item in enumerate(chunk, start)]


Made = tuple[store.NewJob, store.JobRow, bool]  # a batch's job, its row, whether it was replayed


async def create_all(
    web: Web,
    chunks: Sequence[Callable[[], list[store.NewJob]]],
    show: Callable[[list[tuple[store.JobRow, bool]]], list[Job]],
) -> tuple[list[Made], list[Job]]:
    """`create` for each job that `chunks` make, all in one transaction (a key reused with another request rolls
    back them all), and `show` of their rows.

    One INSERT per chunk, and while PostgreSQL writes one, this process makes the next chunk's jobs and shows the
    last chunk's rows: for a batch of 1,000, that work is about as long as the writing, and it need not wait for
    it. Shown before the commit is fine: nothing is answered until the commit is done."""
    db = web.deps.db
    created: list[Made] = []
    alongside: list[asyncio.Future[Any]] = []  # the work done while this task waits on an INSERT

    def meanwhile(work: Callable[[], T]) -> asyncio.Future[T]:
        async def run() -> T:
            return work()

        future = asyncio.ensure_future(run())
        alongside.append(future)
        return future

    shown: list[asyncio.Future[list[Job]]] = []
    try:
        async with db.transaction():  # the last chunk is shown while the COMMIT is on its way
            making = meanwhile(chunks[0])
            for n in range(len(chunks)):
                jobs = await making
                if n + 1 < len(chunks):
                    making = meanwhile(chunks[n + 1])
                rows = await _create_chunk(web, jobs, len(created))
                created += [(job, row, replayed) for job, (row, replayed) in zip(jobs, rows, strict=True)]
                shown.append(meanwhile(functools.partial(show, rows)))
        return created, [job for part in shown for job in await part]
    finally:
        for future in alongside:  # after an error: nothing left running, and no error left unretrieved
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()


async def _create_chunk(web: Web, jobs: list[store.NewJob], start: int) -> list[tuple[store.JobRow, bool]]:
    db = web.deps.db
    created: list[tuple[store.JobRow, bool]] = []
    rows = await store.insert_jobs(db, jobs)
    for n, (job, row) in enumerate(zip(jobs, rows, strict=True), start):
        if row is not None:
            created.append((row, False))
            continue
        try:
            created.append(await _replay_or_reinsert(web, job))
        except IdempotencyKeyReused as exc:
            exc.errors = [FieldError(f"$.jobs[{n}].idempotency_key", e.msg) for e in exc.errors]
            raise
    return created


async def _replay_or_reinsert(web: Web, job: store.NewJob) -> tuple[store.JobRow, bool]:
    """For a job whose Idempotency-Key was taken: the job that key made (replayed), or, once the key is past its
    window, a new job. Conflict when the key keeps changing hands."""
    db, key = web.deps.db, job.idempotency_key
    assert key is not None  # nothing else can conflict
    found = await store.find_idempotent(db, job.tenant, key, window_s=web.config.idempotency_ttl_s)
    if found is not None:
        row, request_hash, expired = found
        if not expired:
            if request_hash != job.request_hash:
                msg = "this Idempotency-Key was already used with a different request; use a new key for a new job"
                raise IdempotencyKeyReused(msg, [FieldError("Idempotency-Key", msg)])
            return row, True
        await store.release_idempotency_key(db, row.id, key)
    [again] = await store.insert_jobs(db, [job])
    if again is None:
        raise Conflict("this Idempotency-Key keeps changing hands; retry")
    return again, False


async def retry(request: Request) -> Response:
    """worker/control.py's retry_job: a new job from a failed, cancelled or expired one; 409 for any other. An
    Idempotency-Key makes it once, as for a submit."""
    web = web_of(request)
    original = await job_or_404(request)
    if original.workflow_id is not None and original.status in control.RETRYABLE:
        return await _resume_workflow(request, web, original)
    try:
        job = control.retry_job(original, tenant_of(request), web.job_types, ttl_s=web.config.job_ttl_s)
    except control.NotRetryable as exc:
        raise Conflict(str(exc)) from None
    except control.TypeGone as exc:
        raise UnknownJobType(str(exc), [FieldError("type", str(exc))]) from None
    await web.submits.take(
        web.deps.redis, caller_of(request).limit_key, rate=web.config.submit_rate_per_s, burst=web.config.submit_burst
    )
    key = idempotency_key(request)
    if key is not None:
        # "The same request" is a retry of the same job, so a client that sends it again gets the job it made.
        fingerprint = hashlib.sha256(b"retry\0" + original.id.bytes).digest()
        job = msgspec.structs.replace(job, idempotency_key=key, request_hash=fingerprint)
    row, replayed = await create(web, job)
    headers = {"Location": f"/v1/jobs/{row.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    else:
        if not await web.enqueues(bell(job, row)):
            await store.undispatch(web.deps.db, row.id, row.attempt)
        web.metrics.submitted.labels(row.type).inc()
    return MsgspecResponse(present(request, row), status_code=202, headers=headers)


async def _resume_workflow(request: Request, web: Web, original: store.JobRow) -> Response:
    """A retry of a workflow's failed (or cancelled) job resumes the workflow from there (worker/workflows.py)."""
    await web.submits.take(
        web.deps.redis, caller_of(request).limit_key, rate=web.config.submit_rate_per_s, burst=web.config.submit_burst
    )
    tenant = tenant_of(request)
    try:
        row, bells = await workflows.resume_from(web.deps.db, tenant, original.id, ttl_s=web.config.job_ttl_s)
    except workflows.NotResumable as exc:
        # Sent again with its Idempotency-Key (its answer was lost): the job the resume made, as a replay.
        made = None
        if idempotency_key(request) is not None and original.workflow_id is not None:
            made = await store.retried_as(web.deps.db, tenant, original.workflow_id, original.id)
        if made is None:
            raise Conflict(str(exc)) from None
        headers = {"Location": f"/v1/jobs/{made.id}", "Idempotent-Replayed": "true"}
        return MsgspecResponse(present(request, made), status_code=202, headers=headers)
    if not await enqueue_many(web.deps.redis, bells, step_s=web.config.priority_step_s):
        await store.undispatch_many(web.deps.db, [(b.job_id, b.started) for b in bells])
    web.deps.notifier.notify(row.workflow_id)
    web.metrics.submitted.labels(row.type).inc(len(bells))
    return MsgspecResponse(present(request, row), status_code=202, headers={"Location": f"/v1/jobs/{row.id}"})


async def create(web: Web, job: store.NewJob) -> tuple[store.JobRow, bool]:
    """Insert the job or, when its Idempotency-Key is taken, find the job that key made: (row, replayed).

    The unique index decides who creates (INSERT ... ON CONFLICT DO NOTHING, never check-then-insert): a concurrent
    duplicate waits for the winner's commit, then finds the winner's row. Past `idempotency_ttl_s` a key is
    released and makes a new job."""
    row = await web.inserts(job)
    if row is not None:
        return row, False
    return await _replay_or_reinsert(web, job)


def inserts(db: Database) -> Batcher[store.NewJob, store.JobRow | None]:
    """The web process's submits, batched (worker/batch.py): those that come while one INSERT is on its way go
    together in the next, one statement and one commit for a burst of submits, with no added wait."""

    async def insert(jobs: Sequence[store.NewJob]) -> list[store.JobRow | None]:
        return await store.insert_jobs(db, jobs)

    return Batcher(insert, shared=database.UNAVAILABLE, linger_s=0.0)


def enqueues(redis: ArqRedis, *, step_s: float) -> Batcher[Bell, bool]:
    """The web process's doorbells, batched as its INSERTs are: one script call rings for a burst of submits."""

    async def ring(bells: Sequence[Bell]) -> list[bool]:
        return [await enqueue_many(redis, bells, step_s=step_s)] * len(bells)

    # Large batches: while Redis hangs each call may take redis_timeout_s, and submits must not pile up behind it.
    return Batcher(ring, shared=(), linger_s=0.0, limit=1_000)
