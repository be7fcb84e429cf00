"""What the dashboard (server/ui/) reads beyond the API's own reads: the overview in one statement, filtered job
lists, a job's children, how many jobs a bulk action would touch, a tenant's recent workflows.

Each statement goes through an index of the tenant's jobs (newest first, or by status) or the last hour's finished
jobs (`jobs_finished`); none reads the whole table. A created range is an id range: v7 ids begin with their
creation time in milliseconds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final
from uuid import UUID

import msgspec
from databases import Database

from worker import sql, stats, store
from worker.job import Error, Status

MAX_BULK: Final = 1_000  # jobs one bulk action of the dashboard touches at most; it says so, and how many match


class Failure(msgspec.Struct, frozen=True):
    id: UUID
    type: str
    status: str
    finished_at: datetime | None
    error: Error | None


class Overview(msgspec.Struct, frozen=True):
    stats: stats.Stats  # what GET /v1/stats answers
    minutes: list[tuple[int, int, int]]  # (minute since the epoch, jobs ended, of them failed); none ended: absent
    failures: list[Failure]  # the newest failed jobs


class _Read(msgspec.Struct, frozen=True):
    live: stats.Live
    hour: dict[str, dict[str, int]]
    minutes: list[tuple[int, int, int]]
    workers: list[stats.LiveWorker]
    failures: list[Failure]


# The overview in one statement, one JSON value: four statements one after another cost the web process four round
# trips' CPU through asyncpg and a Record per row (bench/dashboard.py), where the API's list costs one. The live
# counts and the workers are GET /v1/stats' own statements; the last hour is read once, by minute, type and status,
# for the chart and the counts; the failures go through the tenant's by-status index.
_OVERVIEW = f"""
WITH live AS ({stats.LIVE}),
ended AS (
    SELECT date_trunc('minute', finished_at) AS at, type, status, count(*) AS n
      FROM jobs
     WHERE finished_at > now() - interval '1 hour' AND tenant_id = :tenant
     GROUP BY 1, 2, 3
),
by_type AS (
    SELECT type, json_object_agg(status, n ORDER BY status) AS counts
      FROM (SELECT type, status, sum(n) AS n FROM ended GROUP BY 1, 2) AS s
     GROUP BY type
),
per_minute AS (
    SELECT (extract(epoch FROM at) / 60)::bigint AS m, sum(n) AS n,
           coalesce(sum(n) FILTER (WHERE status = 'failed'), 0) AS failed
      FROM ended
     GROUP BY at
),
failures AS (
    SELECT id, type, status, finished_at, error
      FROM jobs WHERE tenant_id = :tenant AND status = 'failed' ORDER BY id DESC LIMIT :failures
)
SELECT json_build_object(
    'live', json_build_object(
        'types', (SELECT coalesce(json_object_agg(type, json_build_object(
                      'queued', queued, 'scheduled', scheduled, 'waiting', waiting, 'running', running) ORDER BY type),
                      '{{}}') FROM live),
        'oldest_s', (SELECT coalesce(json_object_agg(type, greatest(0, oldest_queued_s) ORDER BY type)
                             FILTER (WHERE oldest_queued_s IS NOT NULL), '{{}}') FROM live)),
    'hour', (SELECT coalesce(json_object_agg(type, counts ORDER BY type), '{{}}') FROM by_type),
    'minutes', (SELECT coalesce(json_agg(json_build_array(m, n, failed) ORDER BY m), '[]') FROM per_minute),
    'workers', (SELECT coalesce(json_agg(w ORDER BY w.name), '[]') FROM ({stats.WORKERS}) AS w),
    'failures', (SELECT coalesce(json_agg(f ORDER BY f.id DESC), '[]') FROM failures AS f))
"""
_read = msgspec.json.Decoder(_Read).decode


async def overview(db: Database, tenant: str, *, fresh_s: float, failures: int = 8) -> Overview:
    """The tenant's queue at a glance (`GET /v1/stats`'s Stats), its last hour by minute, its newest failures."""
    read = _read(await sql.fetch_val(db, _OVERVIEW, {"tenant": tenant, "fresh": fresh_s, "failures": failures}))
    return Overview(stats.summary(read.live, read.hour, read.workers), read.minutes, read.failures)


def id_at(when: datetime, *, end: bool = False) -> UUID:
    """The smallest (or with `end`, the largest) v7 id a job created at `when`'s millisecond could have."""
    ms = min(max(int(when.timestamp() * 1000), 0), (1 << 48) - 1)  # a v7 id's 48 bits: before 1970 is its 0
    rest = (1 << 80) - 1 if end else 0
    return UUID(int=(ms << 80) | rest)


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    """A selection of the tenant's jobs: every field given must match."""

    status: Status | None = None
    type: str | None = None
    metadata: dict[str, Any] | None = None  # contained in the job's: {"customer": "acme"}
    created_from: datetime | None = None
    created_to: datetime | None = None


def _where(tenant: str, wanted: Filter, statuses: list[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = ["tenant_id = :tenant"]
    values: dict[str, Any] = {"tenant": tenant}
    if statuses is not None:
        where.append("status = ANY(CAST(:statuses AS text[]))")
        values["statuses"] = statuses
    elif wanted.status is not None:
        where.append("status = :status")
        values["status"] = wanted.status
    if wanted.type is not None:
        where.append("type = :type")
        values["type"] = wanted.type
    if wanted.metadata:
        where.append("metadata @> CAST(:metadata AS jsonb)")
        values["metadata"] = msgspec.json.encode(wanted.metadata).decode()
    if wanted.created_from is not None:
        where.append("id >= :from_id")
        values["from_id"] = id_at(wanted.created_from)
    if wanted.created_to is not None:
        where.append("id <= :to_id")
        values["to_id"] = id_at(wanted.created_to, end=True)
    return where, values


async def find_jobs(
    db: Database, tenant: str, wanted: Filter, *, limit: int, before: UUID | None = None
) -> list[store.JobRow]:
    """The tenant's jobs that match, newest first, `before` an id for the next page."""
    where, values = _where(tenant, wanted)
    if before is not None:
        where.append("id < :before")
        values["before"] = before
    values["limit"] = limit
    query = f"SELECT {store.COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"
    return [msgspec.convert(dict(r), store.JobRow) for r in await sql.fetch_all(db, query, values)]


async def count_matching(db: Database, tenant: str, wanted: Filter, statuses: list[str], *, cap: int) -> int:
    """How many of the tenant's jobs in `statuses` match, counted up to `cap` + 1 at most (more: "over cap")."""
    where, values = _where(tenant, wanted, statuses)
    values["cap"] = cap + 1
    query = f"SELECT count(*) FROM (SELECT 1 FROM jobs WHERE {' AND '.join(where)} LIMIT :cap) AS matching"
    return int(await sql.fetch_val(db, query, values))


async def matching_ids(db: Database, tenant: str, wanted: Filter, statuses: list[str], *, limit: int) -> list[UUID]:
    """The ids of up to `limit` matching jobs in `statuses`, oldest first."""
    where, values = _where(tenant, wanted, statuses)
    values["limit"] = limit
    query = f"SELECT id FROM jobs WHERE {' AND '.join(where)} ORDER BY id LIMIT :limit"
    return [r["id"] for r in await sql.fetch_all(db, query, values)]


_CHILDREN = f"""
SELECT {store.COLUMNS} FROM jobs WHERE parent_id = :id AND tenant_id = :tenant ORDER BY id LIMIT :limit
"""
_RETRIES = f"SELECT {store.COLUMNS} FROM jobs WHERE retry_of = :id AND tenant_id = :tenant ORDER BY id LIMIT :limit"


async def children(db: Database, tenant: str, job_id: UUID, *, limit: int = 100) -> list[store.JobRow]:
    """The jobs this job spawned (through `jobs_spawned`)."""
    rows = await sql.fetch_all(db, _CHILDREN, {"id": job_id, "tenant": tenant, "limit": limit})
    return [msgspec.convert(dict(r), store.JobRow) for r in rows]


async def retries(db: Database, tenant: str, job_id: UUID, *, limit: int = 20) -> list[store.JobRow]:
    """The jobs a retry made from this one."""
    rows = await sql.fetch_all(db, _RETRIES, {"id": job_id, "tenant": tenant, "limit": limit})
    return [msgspec.convert(dict(r), store.JobRow) for r in rows]


class WorkflowRow(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    created_at: datetime
    finished_at: datetime | None
    steps: int


_WORKFLOWS = """
SELECT w.id, w.status, w.created_at, w.finished_at,
       (SELECT count(*) FROM workflow_steps s WHERE s.workflow_id = w.id) AS steps
  FROM workflows w WHERE w.tenant_id = :tenant ORDER BY w.id DESC LIMIT :limit
"""


async def recent_workflows(db: Database, tenant: str, *, limit: int = 50) -> list[WorkflowRow]:
    rows = await sql.fetch_all(db, _WORKFLOWS, {"tenant": tenant, "limit": limit})
    return [msgspec.convert(dict(r), WorkflowRow) for r in rows]


class StepNode(msgspec.Struct, frozen=True):
    name: str
    after: list[str]
    type: str
    map: str | None


_STEPS = """
SELECT s.name, s.after, s.type, s.map FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id
 WHERE s.workflow_id = :id AND w.tenant_id = :tenant ORDER BY s.position
"""


async def steps(db: Database, tenant: str, workflow_id: UUID) -> list[StepNode]:
    """A workflow's steps in the request's order, each with the steps it waits for: the DAG's edges."""
    rows = await sql.fetch_all(db, _STEPS, {"id": workflow_id, "tenant": tenant})
    return [msgspec.convert(dict(r), StepNode) for r in rows]


def layers(nodes: list[StepNode]) -> list[list[StepNode]]:
    """The steps by depth: each after every step it waits for (a workflow's graph has no cycle)."""
    depth = dict.fromkeys((node.name for node in nodes), 0)
    for _ in nodes:  # a step may be listed before those it waits for: settle, at most one pass per step
        for node in nodes:
            depth[node.name] = 1 + max((depth[a] for a in node.after if a in depth), default=-1)
    found: list[list[StepNode]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for node in nodes:
        found[depth[node.name]].append(node)
    return found
