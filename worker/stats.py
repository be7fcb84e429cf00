"""The queue at a glance: live counts by type, the oldest due job's age, live workers, the last hour's outcomes.

What `GET /v1/stats` answers for a tenant and the Prometheus gauges read for the deployment (tenant None). Every
statement reads only live rows (`jobs_live_expiry`, partial on queued and running) or the last hour's finished ones
(`jobs_finished`): their cost follows the backlog and the hour's throughput, never the table's size.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from databases import Database

from worker import sql

# `expires_at IS NOT NULL` is always true: it lets the planner take `jobs_live_expiry`, whose predicate this is.
_LIVE = """
SELECT type,
       count(*) FILTER (WHERE status = 'queued' AND NOT waiting AND next_run_at <= now()) AS queued,
       count(*) FILTER (WHERE status = 'queued' AND NOT waiting AND next_run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'queued' AND waiting) AS waiting,
       count(*) FILTER (WHERE status = 'running') AS running,
       extract(epoch FROM now() - min(next_run_at) FILTER (
           WHERE status = 'queued' AND NOT waiting AND next_run_at <= now())) AS oldest_queued_s
  FROM jobs
 WHERE status IN ('queued', 'running') AND expires_at IS NOT NULL
       AND (CAST(:tenant AS text) IS NULL OR tenant_id = :tenant)
 GROUP BY type
 ORDER BY type
"""

_LAST_HOUR = """
SELECT type, status, count(*) AS n
  FROM jobs
 WHERE finished_at > now() - interval '1 hour'
       AND (CAST(:tenant AS text) IS NULL OR tenant_id = :tenant)
 GROUP BY type, status
 ORDER BY type, status
"""

# Workers are the deployment's; a tenant sees how many of its own jobs each runs, not the others'.
_WORKERS = """
SELECT w.name, w.host, w.slots, w.started_at, w.seen_at,
       (SELECT count(*) FROM jobs j
         WHERE j.status = 'running' AND j.lease_owner = w.host || ':' || w.pid
               AND (CAST(:tenant AS text) IS NULL OR j.tenant_id = :tenant)) AS running
  FROM workers w
 WHERE w.seen_at > now() - make_interval(secs => :fresh)
 ORDER BY w.name
"""
LIVE, WORKERS = _LIVE, _WORKERS  # for worker/dashboard.py's overview, one statement of them


class TypeCounts(msgspec.Struct, frozen=True):
    queued: int = 0  # due now, waiting for a worker (or for a slot of its tenant's or key's)
    scheduled: int = 0  # due later: a run_at, a retry's backoff
    waiting: int = 0  # parents waiting for their children
    running: int = 0


class LiveWorker(msgspec.Struct, frozen=True):
    name: str
    host: str
    slots: int
    running: int
    started_at: datetime
    seen_at: datetime


class Stats(msgspec.Struct, frozen=True):
    queued: int
    scheduled: int
    waiting: int
    running: int
    oldest_queued_age_s: float | None  # how long the longest-due queued job has waited; None: none is due
    types: dict[str, TypeCounts]
    oldest_queued_age_s_by_type: dict[str, float]
    last_hour: dict[str, int]  # terminal status -> jobs that ended so within the last hour
    last_hour_by_type: dict[str, dict[str, int]]
    workers: list[LiveWorker]


class Live(msgspec.Struct, frozen=True):
    types: dict[str, TypeCounts]
    oldest_s: dict[str, float]  # by type, for the types with a due queued job


async def live(db: Database, tenant: str | None = None) -> Live:
    types: dict[str, TypeCounts] = {}
    oldest: dict[str, float] = {}
    for row in await sql.fetch_all(db, _LIVE, {"tenant": tenant}):
        types[row["type"]] = TypeCounts(row["queued"], row["scheduled"], row["waiting"], row["running"])
        if row["oldest_queued_s"] is not None:
            oldest[row["type"]] = max(0.0, float(row["oldest_queued_s"]))
    return Live(types, oldest)


async def last_hour(db: Database, tenant: str | None = None) -> dict[str, dict[str, int]]:
    """type -> terminal status -> count, for jobs that ended within the last hour."""
    counts: dict[str, dict[str, int]] = {}
    for row in await sql.fetch_all(db, _LAST_HOUR, {"tenant": tenant}):
        counts.setdefault(row["type"], {})[row["status"]] = row["n"]
    return counts


async def workers(db: Database, *, fresh_s: float, tenant: str | None = None) -> list[LiveWorker]:
    rows = await sql.fetch_all(db, _WORKERS, {"tenant": tenant, "fresh": fresh_s})
    return [msgspec.convert(dict(row), LiveWorker) for row in rows]


def summary(now: Live, hour: dict[str, dict[str, int]], live_workers: list[LiveWorker]) -> Stats:
    """The Stats of what `live`, `last_hour` and `workers` read (or worker/dashboard.py's one statement did)."""
    totals: dict[str, int] = {}
    for by_status in hour.values():
        for status, n in by_status.items():
            totals[status] = totals.get(status, 0) + n
    counts = list(now.types.values())
    return Stats(
        queued=sum(c.queued for c in counts),
        scheduled=sum(c.scheduled for c in counts),
        waiting=sum(c.waiting for c in counts),
        running=sum(c.running for c in counts),
        oldest_queued_age_s=max(now.oldest_s.values(), default=None),
        types=now.types,
        oldest_queued_age_s_by_type=now.oldest_s,
        last_hour={s: totals.get(s, 0) for s in ("succeeded", "failed", "cancelled", "expired")},
        last_hour_by_type=hour,
        workers=live_workers,
    )


async def stats(db: Database, tenant: str, *, fresh_s: float) -> Stats:
    now = await live(db, tenant)
    hour = await last_hour(db, tenant)
    return summary(now, hour, await workers(db, fresh_s=fresh_s, tenant=tenant))
