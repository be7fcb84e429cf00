"""/v1/workflows: submit a DAG of steps, show it, cancel it. The engine's side is worker/workflows.py.

Each step's type, input and limits are checked exactly as a submit's are (server/submit.py's make_job), and the graph
by worker/workflows.py's check_graph, all before anything is written: each bad field is a 422 naming it, like
`$.steps[2].after[0]`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server import stream
from server.auth import caller_of, tenant_of
from server.body import json_body
from server.problems import Conflict, FieldError, IdempotencyKeyReused, NotFound, ValidationError
from server.responses import MsgspecResponse
from server.state import web_of
from server.submit import MAX_METADATA_BYTES, SubmitJob, check_callback, decode, idempotency_key, make_job
from worker import events, store, workflows
from worker.queue import enqueue_many

StepName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class StepBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A step of `POST /v1/workflows`: a name, and the job it runs, as a submit body has it."""

    name: StepName
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    input: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    after: Annotated[list[StepName], msgspec.Meta(max_length=workflows.MAX_STEPS)] = []
    map: StepName | None = None  # one job per item of this step's list result
    metadata: dict[str, Any] = {}
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    timeout_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=-10, le=10)] = 0


class SubmitWorkflow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    steps: Annotated[list[StepBody], msgspec.Meta(min_length=1, max_length=workflows.MAX_STEPS)]
    metadata: dict[str, Any] = {}
    callback_url: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # one webhook, when it ends


_decoder = msgspec.json.Decoder(SubmitWorkflow)
_encode = msgspec.json.Encoder().encode


async def submit(request: Request) -> Response:
    web = web_of(request)
    config = web.config
    body = await json_body(
        request, config.max_body_bytes, timeout_s=config.body_timeout_s, what='a JSON object `{"steps": [...]}`'
    )
    spec: SubmitWorkflow = decode(body, _decoder)
    try:
        workflows.check_graph([s.name for s in spec.steps], [s.after for s in spec.steps], [s.map for s in spec.steps])
    except workflows.GraphError as exc:
        raise ValidationError(f"{exc} (at {exc.loc})", [FieldError(exc.loc, str(exc))]) from None
    metadata = _encode(spec.metadata)
    if len(metadata) > MAX_METADATA_BYTES:
        msg = f"metadata must encode to at most {MAX_METADATA_BYTES} bytes of JSON"
        raise ValidationError(msg, [FieldError("$.metadata", msg)])
    await web.submits.take(
        web.deps.redis, caller_of(request).limit_key, rate=config.submit_rate_per_s, burst=config.submit_burst
    )
    key, tenant = idempotency_key(request), tenant_of(request)
    steps = [_step(request, tenant, n, step) for n, step in enumerate(spec.steps)]
    if spec.callback_url is not None:
        await check_callback(web, spec.callback_url, "$")  # the SSRF guard, as a job's; again at each delivery
    # "The same request" for an Idempotency-Key: the same steps, as checked and completed, and the same metadata
    canonical: list[Any] = [steps, spec.metadata] + ([spec.callback_url] if spec.callback_url is not None else [])
    fingerprint = hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).digest()
    try:
        workflow_id, bells = await workflows.create(
            web.deps.db,
            tenant,
            steps,
            metadata=metadata,
            ttl_s=config.job_ttl_s,
            key=key,
            request_hash=fingerprint,
            callback_url=spec.callback_url,
        )
    except workflows.KeyReused:
        msg = "this Idempotency-Key was already used with a different workflow; use a new key for a new one"
        raise IdempotencyKeyReused(msg, [FieldError("Idempotency-Key", msg)]) from None
    headers = {"Location": f"/v1/workflows/{workflow_id}", "Retry-After": "1"}
    if bells is None:
        headers["Idempotent-Replayed"] = "true"
    elif bells and not await enqueue_many(web.deps.redis, bells, step_s=config.priority_step_s):
        await store.undispatch_many(web.deps.db, [(b.job_id, b.started) for b in bells])  # the sweep rings
    return MsgspecResponse(await _workflow_or_404(request, workflow_id), status_code=202, headers=headers)


def _step(request: Request, tenant: str, n: int, step: StepBody) -> workflows.Step:
    """The step's job, checked as a submit's; its graph fields as given (check_graph has passed them)."""
    body = SubmitJob(
        type=step.type,
        input=step.input,
        metadata=step.metadata,
        max_attempts=step.max_attempts,
        timeout_s=step.timeout_s,
        priority=step.priority,
    )
    job = make_job(web_of(request), tenant, body, None, at=f"$.steps[{n}]")
    after = step.after + ([step.map] if step.map is not None and step.map not in step.after else [])
    return workflows.Step(
        name=step.name,
        after=after,
        map=step.map,
        type=job.type,
        input=job.input,
        metadata=job.metadata,
        max_attempts=job.max_attempts,
        timeout_s=job.timeout_s,
        retry_safe=job.retry_safe,
        priority=job.priority,
    )


def _workflow_id(request: Request) -> UUID:
    text = str(request.path_params["id"])
    if not re.fullmatch(r"[0-9a-fA-F-]{32,36}", text):
        raise NotFound("no such workflow")
    try:
        return UUID(text)
    except ValueError:
        raise NotFound("no such workflow") from None


async def _workflow_or_404(request: Request, workflow_id: UUID) -> workflows.Workflow:
    found = await workflows.get(web_of(request).deps.db, tenant_of(request), workflow_id)
    if found is None:
        raise NotFound("no such workflow")
    return found


async def show(request: Request) -> Response:
    return MsgspecResponse(await _workflow_or_404(request, _workflow_id(request)))


async def cancel(request: Request) -> Response:
    """worker/workflows.py's cancel; a workflow already over: 409."""
    workflow_id = _workflow_id(request)
    if not await workflows.cancel(web_of(request).deps, tenant_of(request), workflow_id):
        over = await _workflow_or_404(request, workflow_id)  # 404 when unknown
        raise Conflict(f"the workflow is already {over.status}")
    return MsgspecResponse(
        await _workflow_or_404(request, workflow_id),
        status_code=202,
        headers={"Location": f"/v1/workflows/{workflow_id}"},
    )


async def follow(request: Request) -> Response:
    """GET /v1/workflows/{id}/events: the workflow's `step` and `workflow` events as SSE, resumable with
    Last-Event-ID and closed after the event that ends it, as a job's stream is (server/stream.py)."""
    workflow_id = _workflow_id(request)
    after = stream.last_event_id(request)
    found = await _workflow_or_404(request, workflow_id)  # 404 before any stream
    db = web_of(request).deps.db
    first = await events.read_workflow_after(db, workflow_id, after) if found.done else []
    if found.done and not first:
        return Response(status_code=204)  # nothing after Last-Event-ID: EventSource stops for good

    async def render(event: events.Event) -> bytes:
        return stream.plain_frame(event)

    return await stream.open_stream(
        request, workflow_id, after, first, render, source=events.WORKFLOW_LOG, caller_holder="this read token"
    )
