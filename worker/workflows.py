"""Workflows: a DAG of steps, each step one job or (`map`) one job per item of another step's list result.

The state lives in PostgreSQL (migrations/0013_workflows.sql): `workflows`, `workflow_steps`, and the jobs, which
carry `workflow_id`, `step`, `item` and `upstream`. A trigger on jobs does the bookkeeping in the transaction that
ends each job, whoever ends it: a step's last job to succeed makes the steps waiting on it `ready`, a job that
fails for good (or is cancelled) ends the workflow and cancels what has not started. This module makes a ready
step's jobs (`start_ready`): the worker that ended the job calls it right after its commit, and every sweep pass
calls it for what a dead worker left. A step is taken from `ready` by the UPDATE in the transaction that inserts its
jobs, so it starts once; waiting is a row, never a coroutine holding a worker slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
from databases import Database
from uuid_utils.compat import uuid7

from worker import sql, store, tracing
from worker.bulk import cancel_matching
from worker.deps import Deps
from worker.queue import Bell

MAX_STEPS = 100  # steps in one workflow
MAX_MAP_ITEMS = 10_000  # jobs one map step makes at most: a longer list fails the workflow, naming the step
_INSERT_CHUNK = 1_000  # a map step's jobs go in INSERTs of this many

WorkflowStatus = Literal["running", "succeeded", "failed", "cancelled"]
StepStatus = Literal["waiting", "ready", "running", "succeeded", "failed", "cancelled"]
_encode = msgspec.json.Encoder().encode


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """A step as it is stored: where it sits in the graph, and the job each of its jobs is made from (checked and
    completed as a submit's is, by the web)."""

    name: str
    after: list[str]  # its map source included
    map: str | None
    type: str
    input: bytes  # JSON
    metadata: bytes  # JSON
    max_attempts: int
    timeout_s: int
    retry_safe: bool
    priority: int = 0


class GraphError(ValueError):
    """The steps do not make a DAG: `loc` names the field, e.g. `$.steps[2].after[0]`."""

    def __init__(self, loc: str, message: str) -> None:
        super().__init__(message)
        self.loc = loc


def check_graph(names: Sequence[str], after: Sequence[Sequence[str]], maps: Sequence[str | None]) -> None:
    """Raise GraphError unless the steps' names are unique, every `after` and `map` names another step, and no
    step waits, however indirectly, on itself."""
    place: dict[str, int] = {}
    for n, name in enumerate(names):
        if name in place:
            raise GraphError(f"$.steps[{n}].name", f"two steps are named {name!r}")
        place[name] = n
    for n, (waits, source) in enumerate(zip(after, maps, strict=True)):
        named = [(f"$.steps[{n}].after[{k}]", other) for k, other in enumerate(waits)]
        for loc, other in named + ([] if source is None else [(f"$.steps[{n}].map", source)]):
            if other not in place:
                raise GraphError(loc, f"no step is named {other!r}")
            if other == names[n]:
                raise GraphError(loc, "a step can't wait on itself")
    # Kahn: what is never freed of its waits is on a cycle, or waits on one
    waiting = {name: set(w) | ({m} if m else set()) for name, w, m in zip(names, after, maps, strict=True)}
    done: set[str] = set()
    while free := [name for name, waits in waiting.items() if name not in done and waits <= done]:
        done.update(free)
    if stuck := [name for name in names if name not in done]:
        raise GraphError(f"$.steps[{place[stuck[0]]}].after", f"steps {', '.join(stuck)} wait on each other in a cycle")


# -- the resource -----------------------------------------------------------------------------------


class StepState(msgspec.Struct, frozen=True):
    status: StepStatus
    job_ids: list[UUID]  # a map's in item order
    counts: dict[str, int]  # its jobs by status: how far a map has got, without reading each job


class WorkflowLinks(msgspec.Struct, frozen=True):
    self: str


class Workflow(msgspec.Struct, frozen=True, kw_only=True):
    """The Workflow resource of API.md."""

    id: UUID
    status: WorkflowStatus
    done: bool
    steps: dict[str, StepState]  # in the order the request gave them
    metadata: dict[str, Any]
    error: dict[str, Any] | None  # why it failed: the step, the job, its status and error
    callback_url: str | None  # gets the final Workflow as a signed webhook when it ends
    created_at: datetime
    finished_at: datetime | None
    links: WorkflowLinks


_GET = """
SELECT w.id, w.status, w.metadata, w.error, w.callback_url, w.created_at, w.finished_at,
       array_agg(s.name ORDER BY s.position) AS names, array_agg(s.status ORDER BY s.position) AS statuses
  FROM workflows w JOIN workflow_steps s ON s.workflow_id = w.id
 WHERE w.id = :id AND w.tenant_id = :tenant
 GROUP BY w.id
"""
_JOB_IDS = "SELECT step, id, status FROM jobs WHERE workflow_id = :id ORDER BY step, item NULLS FIRST, id"


async def get(db: Database, tenant: str, workflow_id: UUID) -> Workflow | None:
    """The workflow, as `tenant` may see it; None: unknown to that tenant."""
    record = await sql.fetch_one(db, _GET, {"id": workflow_id, "tenant": tenant})
    if record is None:
        return None
    jobs: dict[str, list[UUID]] = {}
    counts: dict[str, dict[str, int]] = {}
    for row in await sql.fetch_all(db, _JOB_IDS, {"id": workflow_id}):
        jobs.setdefault(row["step"], []).append(row["id"])
        of_step = counts.setdefault(row["step"], {})
        of_step[row["status"]] = of_step.get(row["status"], 0) + 1
    steps = {
        name: StepState(status, jobs.get(name, []), counts.get(name, {}))
        for name, status in zip(record["names"], record["statuses"], strict=True)
    }
    return Workflow(
        id=record["id"],
        status=record["status"],
        done=record["status"] != "running",
        steps=steps,
        metadata=msgspec.json.decode(record["metadata"]),
        error=None if record["error"] is None else msgspec.json.decode(record["error"]),
        callback_url=record["callback_url"],
        created_at=record["created_at"],
        finished_at=record["finished_at"],
        links=WorkflowLinks(f"/v1/workflows/{workflow_id}"),
    )


# -- making and moving ------------------------------------------------------------------------------

_CREATE = """
INSERT INTO workflows (id, tenant_id, metadata, idempotency_key, request_hash, callback_url)
VALUES (:id, :tenant, CAST(:metadata AS jsonb), :key, :hash, :callback_url)
ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
"""
_FIND = "SELECT id, request_hash FROM workflows WHERE tenant_id = :tenant AND idempotency_key = :key"
_CREATE_STEPS = """
INSERT INTO workflow_steps (workflow_id, name, position, after, map, status, type, input, metadata, max_attempts,
                            timeout_s, retry_safe, priority)
SELECT :workflow, name, position, ARRAY(SELECT jsonb_array_elements_text(after)),
       map, CASE WHEN after = '[]' THEN 'ready' ELSE 'waiting' END, type, input, metadata, max_attempts, timeout_s,
       retry_safe, priority
  FROM jsonb_to_recordset(CAST(:steps AS jsonb))
       AS s(name text, position int, after jsonb, map text, type text, input jsonb, metadata jsonb,
            max_attempts int, timeout_s int, retry_safe bool, priority int)
"""


class _StoredStep(msgspec.Struct, frozen=True):
    name: str
    position: int
    after: list[str]
    map: str | None
    type: str
    input: msgspec.Raw
    metadata: msgspec.Raw
    max_attempts: int
    timeout_s: int
    retry_safe: bool
    priority: int


class KeyReused(Exception):
    """The Idempotency-Key made a workflow of other steps: a new workflow needs a new key."""


async def create(
    db: Database,
    tenant: str,
    steps: Sequence[Step],
    *,
    metadata: bytes,
    ttl_s: float,
    key: str | None = None,
    request_hash: bytes | None = None,
    callback_url: str | None = None,
) -> tuple[UUID, list[Bell] | None]:
    """A new workflow, its steps, and the jobs of those that wait on nothing, in one transaction: the caller rings
    the bells (or, Redis down, leaves them to the sweep: the rows are the outbox). With `key`, the one workflow that
    key made for the tenant, and None for bells when it was made before (KeyReused if with another `request_hash`):
    the unique index decides, so two submits racing with one key make one workflow."""
    workflow_id = uuid7()
    stored = [
        _StoredStep(
            s.name,
            n,
            s.after,
            s.map,
            s.type,
            msgspec.Raw(s.input),
            msgspec.Raw(s.metadata),
            s.max_attempts,
            s.timeout_s,
            s.retry_safe,
            s.priority,
        )
        for n, s in enumerate(steps)
    ]
    values = {
        "id": workflow_id,
        "tenant": tenant,
        "metadata": metadata.decode(),
        "key": key,
        "hash": request_hash,
        "callback_url": callback_url,
    }
    async with db.transaction():
        if await sql.fetch_val(db, _CREATE, values) is None:  # the key's workflow exists (or its maker commits now)
            found = await sql.fetch_one(db, _FIND, {"tenant": tenant, "key": key})
            assert found is not None  # nothing deletes a workflow but its tenant's deletion
            if bytes(found["request_hash"]) != request_hash:
                raise KeyReused(key)
            return found["id"], None
        await sql.execute(db, _CREATE_STEPS, {"workflow": workflow_id, "steps": _encode(stored).decode()})
        bells = await _start_workflow(db, workflow_id, ttl_s=ttl_s)
    return workflow_id, bells


_READY_WORKFLOWS = """
SELECT DISTINCT s.workflow_id FROM workflow_steps s
 WHERE s.status = 'ready' AND (CAST(:ids AS uuid[]) IS NULL OR s.workflow_id = ANY(CAST(:ids AS uuid[])))
 LIMIT :batch
"""
# One workflow at a time, locked as the trigger locks it (the workflow's row, then its steps): a worker that finds it
# locked skips it, since whoever holds it is ending one of its jobs and calls start_ready after its own commit.
_LOCK = """
SELECT tenant_id FROM workflows WHERE id = :id AND status = 'running' FOR NO KEY UPDATE SKIP LOCKED
"""
_TAKE_READY = """
UPDATE workflow_steps SET status = 'running'
 WHERE workflow_id = :id AND status = 'ready'
RETURNING name, after, map, type, input, metadata, max_attempts, timeout_s, retry_safe, priority
"""
_STEP_MAPS = "SELECT name, map FROM workflow_steps WHERE workflow_id = :id"
_UPSTREAM = """
SELECT step, result, traceparent FROM jobs
 WHERE workflow_id = :id AND step = ANY(CAST(:steps AS text[])) AND status = 'succeeded'
 ORDER BY step, item NULLS FIRST
"""
_COUNT = "UPDATE workflow_steps SET remaining = :n WHERE workflow_id = :id AND name = :step"
_SUCCEEDED = "SELECT workflow_step_succeeded(:id, :step)"
_FAIL = "SELECT workflow_end(:id, 'failed', :step, CAST(:why AS jsonb))"


async def start_ready(db: Database, workflow_ids: Sequence[UUID] | None, *, ttl_s: float, batch: int) -> list[Bell]:
    """Make the jobs of the ready steps of `workflow_ids` (None: of any workflow, up to `batch` of them), each
    workflow in its own transaction; the bells for the caller to ring."""
    ids = None if workflow_ids is None else list(workflow_ids)
    bells: list[Bell] = []
    for record in await sql.fetch_all(db, _READY_WORKFLOWS, {"ids": ids, "batch": batch}):
        async with db.transaction():
            bells += await _start_workflow(db, record["workflow_id"], ttl_s=ttl_s)
    return bells


async def _start_workflow(db: Database, workflow_id: UUID, *, ttl_s: float) -> list[Bell]:
    """Within the caller's transaction: the jobs of the workflow's ready steps; a map step over an empty list is over
    at once, which may make more steps ready, so this goes on until none is."""
    tenant = await sql.fetch_val(db, _LOCK, {"id": workflow_id})
    if tenant is None:
        return []  # ended, or someone else holds it
    maps = {r["name"]: r["map"] for r in await sql.fetch_all(db, _STEP_MAPS, {"id": workflow_id})}
    bells: list[Bell] = []
    while steps := await sql.fetch_all(db, _TAKE_READY, {"id": workflow_id}):
        for step in steps:
            jobs = await _jobs_of(db, workflow_id, tenant, step, maps, ttl_s=ttl_s)
            if jobs is None:  # the workflow failed: nothing more starts
                return bells
            for start in range(0, len(jobs), _INSERT_CHUNK):
                rows = await store.insert_jobs(db, jobs[start : start + _INSERT_CHUNK])
                bells += [Bell(row.id, row.attempt, step["priority"], tenant) for row in rows if row is not None]
            await sql.execute(db, _COUNT, {"id": workflow_id, "step": step["name"], "n": len(jobs)})
            if not jobs:
                await sql.execute(db, _SUCCEEDED, {"id": workflow_id, "step": step["name"]})
    return bells


async def _jobs_of(
    db: Database, workflow_id: UUID, tenant: str, step: Any, maps: dict[str, str | None], *, ttl_s: float
) -> list[store.NewJob] | None:
    """The jobs of a step just taken, each with its `upstream`; None when its map source is not a list (or too long)
    and the workflow has failed for it."""
    name, source = step["name"], step["map"]
    results: dict[str, list[msgspec.Raw]] = {}
    traced = None if step["after"] else tracing.traceparent()  # a first step: the submit's trace (worker/tracing.py)
    for row in await sql.fetch_all(db, _UPSTREAM, {"id": workflow_id, "steps": list(step["after"])}):
        results.setdefault(row["step"], []).append(msgspec.Raw(row["result"].encode()))
        traced = traced or row["traceparent"]  # a later one: the trace of the steps it came after
    # a map step's results are its list; another step's, its one result
    upstream: dict[str, Any] = {
        after: results.get(after, []) if maps.get(after) else results.get(after, [msgspec.Raw(b"null")])[0]
        for after in step["after"]
    }

    def job(item: int | None, shared: dict[str, Any]) -> store.NewJob:
        return _step_job(step, workflow_id, tenant, name, item, _encode(shared), ttl_s=ttl_s, traceparent=traced)

    if source is None:
        return [job(None, upstream)]
    items = upstream[source]
    if not isinstance(items, list):
        try:
            items = msgspec.json.decode(items, type=list[msgspec.Raw])
        except msgspec.ValidationError:
            await _fail(db, workflow_id, name, f"step {name!r} maps over {source!r}, whose result is not a list")
            return None
    if len(items) > MAX_MAP_ITEMS:
        why = f"step {name!r} maps over {len(items)} items of {source!r}; a map makes at most {MAX_MAP_ITEMS} jobs"
        await _fail(db, workflow_id, name, why)
        return None
    return [job(n, {**upstream, source: item}) for n, item in enumerate(items)]


async def _fail(db: Database, workflow_id: UUID, step: str, message: str) -> None:
    why = _encode({"step": step, "type": "invalid_map", "message": message}).decode()
    await sql.execute(db, _FAIL, {"id": workflow_id, "step": step, "why": why})


_CANCEL = """
SELECT workflow_end(id, 'cancelled', NULL, CAST(:why AS jsonb)) FROM workflows
 WHERE id = :id AND tenant_id = :tenant AND status = 'running'
"""
_CANCELLED = '{"type": "cancelled", "message": "the workflow was cancelled on request"}'


async def cancel(deps: Deps, tenant: str, workflow_id: UUID) -> bool:
    """End a running workflow `cancelled`: nothing of it starts from now on, its queued jobs end `cancelled` and its
    running ones are asked to stop, as a job's cancel asks. False: it was not running (or is not the tenant's)."""
    record = await sql.fetch_one(deps.db, _CANCEL, {"id": workflow_id, "tenant": tenant, "why": _CANCELLED})
    if record is None:
        return False
    while await cancel_matching(deps.jobs, deps.redis, tenant, workflow=workflow_id):
        pass  # a map's jobs may be more than one call cancels
    deps.notifier.notify(workflow_id)
    return True


# -- resuming from a failed step ----------------------------------------------------------------------


class NotResumable(Exception):
    """A retry of a workflow's job that can't resume the workflow now (409 in the API): the message says why."""


_REOPEN_LOCK = "SELECT status FROM workflows WHERE id = :id AND tenant_id = :tenant FOR NO KEY UPDATE"
_ITS_JOBS = """
SELECT id, tenant_id, step, item, status, retry_of, type, input, metadata, max_attempts, timeout_s, retry_safe,
       priority, upstream
  FROM jobs WHERE workflow_id = :id ORDER BY id
"""
_REOPEN = "UPDATE workflows SET status = 'running', error = NULL, finished_at = NULL WHERE id = :id"
_UNSTARTED_WAIT = """
UPDATE workflow_steps SET status = 'waiting', remaining = 0
 WHERE workflow_id = :id AND status IN ('failed', 'cancelled') AND NOT (name = ANY(CAST(:started AS text[])))
"""
_RESTART = """
UPDATE workflow_steps s SET status = 'running', remaining = r.n
  FROM unnest(CAST(:steps AS text[]), CAST(:counts AS int[])) AS r(name, n)
 WHERE s.workflow_id = :id AND s.name = r.name AND s.status IN ('failed', 'cancelled')
"""
_OVER_SINCE = """
SELECT workflow_step_succeeded(:id, name) FROM workflow_steps
 WHERE workflow_id = :id AND status IN ('failed', 'cancelled') AND name = ANY(CAST(:steps AS text[]))
"""
_READY_AGAIN = """
UPDATE workflow_steps s SET status = 'ready'
 WHERE s.workflow_id = :id AND s.status = 'waiting'
   AND NOT EXISTS (SELECT 1 FROM workflow_steps d
                    WHERE d.workflow_id = s.workflow_id AND d.name = ANY (s.after) AND d.status <> 'succeeded')
"""


async def resume_from(db: Database, tenant: str, original: UUID, *, ttl_s: float) -> tuple[store.JobRow, list[Bell]]:
    """`POST /v1/jobs/{id}/retry` on a job of a workflow that ended failed or cancelled: the workflow runs again
    from where it stopped. Every job of it that did not succeed (and was not retried before) is made again, with
    `retry_of` naming it and its own item and upstream; a step that never started waits again, or is ready; what
    succeeded stays done. Returns the job made from `original`, and the bells to ring."""
    async with db.transaction():
        record = await sql.fetch_one(db, _GET_WORKFLOW_OF, {"job": original, "tenant": tenant})
        if record is None:
            raise NotResumable("the job is not part of a workflow of this tenant")
        workflow_id = record["workflow_id"]
        status = await sql.fetch_val(db, _REOPEN_LOCK, {"id": workflow_id, "tenant": tenant})
        if status not in ("failed", "cancelled"):
            raise NotResumable(f"its workflow {workflow_id} is {status}: only a failed or cancelled one resumes")
        jobs = await sql.fetch_all(db, _ITS_JOBS, {"id": workflow_id})
        if live := [j for j in jobs if j["status"] in ("queued", "running")]:
            raise NotResumable(f"{len(live)} jobs of workflow {workflow_id} have not ended yet; retry once they have")
        replaced = {j["retry_of"] for j in jobs if j["retry_of"] is not None}
        if original in replaced:
            raise NotResumable(f"the job was retried already, and its workflow {workflow_id} ended again since")
        again = [j for j in jobs if j["status"] != "succeeded" and j["id"] not in replaced]
        made = [_made_again(j, workflow_id, ttl_s=ttl_s) for j in again]
        counts: dict[str, int] = {}
        for j in again:
            counts[j["step"]] = counts.get(j["step"], 0) + 1
        await sql.execute(db, _REOPEN, {"id": workflow_id})
        await sql.execute(db, _UNSTARTED_WAIT, {"id": workflow_id, "started": sorted({j["step"] for j in jobs})})
        await sql.execute(db, _RESTART, {"id": workflow_id, "steps": list(counts), "counts": list(counts.values())})
        # a step whose jobs all went on to succeed after the workflow ended: over now, which readies what follows
        finished = sorted({j["step"] for j in jobs} - counts.keys())
        await sql.fetch_all(db, _OVER_SINCE, {"id": workflow_id, "steps": finished})  # every row: each one a call
        rows: list[store.JobRow] = []
        for start in range(0, len(made), _INSERT_CHUNK):
            rows += [r for r in await store.insert_jobs(db, made[start : start + _INSERT_CHUNK]) if r is not None]
        await sql.execute(db, _READY_AGAIN, {"id": workflow_id})
        bells = [Bell(r.id, r.attempt, r.priority, r.tenant_id) for r in rows]
        bells += await _start_workflow(db, workflow_id, ttl_s=ttl_s)
    (asked,) = [r for r, j in zip(rows, again, strict=True) if j["id"] == original]
    return asked, bells


_GET_WORKFLOW_OF = "SELECT workflow_id FROM jobs WHERE id = :job AND tenant_id = :tenant AND workflow_id IS NOT NULL"


def _made_again(job: Any, workflow_id: UUID, *, ttl_s: float) -> store.NewJob:
    upstream = None if job["upstream"] is None else job["upstream"].encode()
    return _step_job(
        job,
        workflow_id,
        job["tenant_id"],
        job["step"],
        job["item"],
        upstream,
        ttl_s=ttl_s,
        retry_of=job["id"],
        traceparent=tracing.traceparent(),  # the retry request's: a resume is a new trace, as a job's retry is
    )


def _step_job(
    template: Any,
    workflow_id: UUID,
    tenant: str,
    step: str,
    item: int | None,
    upstream: bytes | None,
    *,
    ttl_s: float,
    retry_of: UUID | None = None,
    traceparent: str | None = None,
) -> store.NewJob:
    """A job of a step, from `template`: its step's row, or (made again) the job it replaces."""
    return store.NewJob(
        id=uuid7(),
        tenant=tenant,
        type=template["type"],
        input=template["input"].encode(),
        max_attempts=template["max_attempts"],
        timeout_s=template["timeout_s"],
        retry_safe=template["retry_safe"],
        callback_url=None,
        metadata=template["metadata"].encode(),
        ttl_s=ttl_s,
        retry_of=retry_of,
        priority=template["priority"],
        workflow_id=workflow_id,
        step=step,
        item=item,
        upstream=upstream,
        traceparent=traceparent,
    )
