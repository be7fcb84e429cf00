"""How many jobs may run at once, per tenant: the live workers' slots, each tenant's cap, and the default share.

One tenant's long jobs must never take every worker slot (fifty day-long `sleep` jobs, and another tenant's
`square_sum` waited until they were cancelled). A claim admits a job only while its tenant runs fewer than its cap
(worker/store.py `claim_many`, counted and locked in the claim's statement); a job turned away waits `queued`,
undispatched, holding no worker slot, until one of the tenant's jobs stops running and gives its slot back
(migrations/0006's trigger) and `wake` dispatches it, or the sweep does.

A tenant's cap is its own (`outlast tenants limit TENANT N`), or else the deployment's default: a share
(`OUTLAST_TENANT_MAX_SHARE`, half) of the slots of the workers alive now, in force once two or more tenants hold
an API key. A deployment of one tenant is never capped by default: there is nobody to starve.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from databases import Database

from worker import sql
from worker.job import Rate
from worker.queue import Bell

# A tenant's cap on running jobs in SQL, over `tenants t`: its own, else the deployment's default (NULL: none).
CAP_SQL = "COALESCE(t.max_running, CAST(:default_cap AS int))"

# The job types' `concurrency` limits, as a relation `l(type, n)` from the `limit_values` parameters.
LIMITS_SQL = "unnest(CAST(:limit_types AS text[]), CAST(:limits AS int[])) AS l(type, n)"

# Over `jobs`: its concurrency key has no slot free (a claim would only turn it away).
KEY_FULL_SQL = f"""EXISTS (
    SELECT 1 FROM concurrency_slots s JOIN {LIMITS_SQL} ON l.type = s.type
     WHERE s.type = jobs.type AND s.key = jobs.concurrency_key AND s.running >= l.n)"""


def limit_values(limits: Mapping[str, int]) -> dict[str, list[Any]]:
    """The parameters LIMITS_SQL reads: each type's `concurrency`."""
    return {"limit_types": list(limits), "limits": list(limits.values())}


# The job types' `rate` limits, as a relation `r(type, count, per)` from the `rate_values` parameters.
RATES_SQL = (
    "unnest(CAST(:rate_types AS text[]), CAST(:rate_counts AS float8[]), CAST(:rate_pers AS float8[]))"
    " AS r(type, count, per)"
)


def rate_values(rates: Mapping[str, Rate]) -> dict[str, list[Any]]:
    """The parameters RATES_SQL reads: each type's `rate`."""
    return {
        "rate_types": list(rates),
        "rate_counts": [float(r.count) for r in rates.values()],
        "rate_pers": [float(r.per_s) for r in rates.values()],
    }


_BUCKETS = f"""
INSERT INTO rate_buckets (type, tokens) SELECT r.type, r.count FROM {RATES_SQL} ON CONFLICT (type) DO NOTHING
"""


async def ensure_buckets(db: Database, capacity: Capacity) -> None:
    """The rate buckets of the types this worker knows, full when new (each sweep pass: the claim needs them)."""
    if capacity.rates:
        await sql.execute(db, _BUCKETS, rate_values(capacity.rates))


@dataclass
class Capacity:
    """This worker as the `workers` table shows it, and the default cap its last sweep pass computed."""

    name: str
    slots: int
    share: float  # OUTLAST_TENANT_MAX_SHARE
    default_cap: int | None = None  # None: no default in force
    limits: Mapping[str, int] = field(default_factory=dict)  # each job type's `concurrency`, those that declare one
    rates: Mapping[str, Rate] = field(default_factory=dict)  # each job type's `rate`, those that declare one
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    refreshed_at: float = -math.inf  # time.monotonic() of its last `refresh`

    def refreshed_s_ago(self) -> float:
        return time.monotonic() - self.refreshed_at


_REFRESH = """
WITH me AS (
    INSERT INTO workers (name, host, pid, slots) VALUES (:name, :host, :pid, :slots)
    ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, slots = EXCLUDED.slots,
                                     seen_at = now(),
                                     started_at = CASE WHEN workers.pid = EXCLUDED.pid THEN workers.started_at
                                                       ELSE now() END
    RETURNING slots
)
SELECT (SELECT slots FROM me)
       + (SELECT COALESCE(sum(slots), 0) FROM workers
           WHERE name <> :name AND seen_at > now() - make_interval(secs => :fresh)) AS slots,
       (SELECT count(DISTINCT tenant_id) FROM api_keys WHERE revoked_at IS NULL) AS tenants
"""


async def refresh(db: Database, capacity: Capacity, *, fresh_s: float) -> None:
    """Say this worker is alive, and recompute the default cap from the workers seen within `fresh_s`."""
    values = {"name": capacity.name, "host": capacity.host, "pid": capacity.pid, "slots": capacity.slots}
    row = await sql.fetch_one(db, _REFRESH, {**values, "fresh": fresh_s})
    assert row is not None
    capacity.default_cap = default_cap(int(row["slots"]), int(row["tenants"]), capacity.share)
    capacity.refreshed_at = time.monotonic()


def default_cap(slots: int, tenants: int, share: float) -> int | None:
    """A tenant's share of `slots` once `tenants` (holding keys) could starve one another; None: no cap."""
    if tenants < 2 or share >= 1.0:
        return None
    return max(1, math.ceil(share * slots))


async def leave(db: Database, name: str) -> None:
    """This worker is stopping: its slots are no longer the deployment's."""
    await sql.execute(db, "DELETE FROM workers WHERE name = :name", {"name": name})


async def forget_stale(db: Database, *, older_than_s: float) -> None:
    await sql.execute(db, "DELETE FROM workers WHERE seen_at < now() - make_interval(secs => :s)", {"s": older_than_s})


# -- jobs waiting for a slot ------------------------------------------------------------------------

_WAKE = f"""
WITH room AS (
    -- a tenant no longer capped wakes a batch: what a cap turned away before waits undispatched all the same
    SELECT t.id, least(COALESCE(greatest({CAP_SQL} - t.running, 0), :batch), :batch) AS n
      FROM tenants t WHERE t.id = ANY(CAST(:tenants AS text[]))
), due AS (
    SELECT w.id FROM room, LATERAL (
        SELECT id FROM jobs
         WHERE status = 'queued' AND dispatched_at IS NULL AND tenant_id = room.id AND next_run_at <= now()
           AND NOT {KEY_FULL_SQL}
         ORDER BY priority DESC, next_run_at, id LIMIT room.n FOR UPDATE SKIP LOCKED
    ) w
)
UPDATE jobs j SET dispatched_at = now() FROM due WHERE j.id = due.id RETURNING j.id, j.attempt, j.priority, j.tenant_id
"""

_WAKE_KEYS = f"""
WITH room AS (  -- each key given, with as many jobs as it has slots free now
    SELECT s.type, s.key, least(greatest(l.n - s.running, 0), :batch) AS n
      FROM (SELECT DISTINCT type, key FROM unnest(CAST(:types AS text[]), CAST(:keys AS text[])) AS w(type, key)) w
      JOIN concurrency_slots s ON s.type = w.type AND s.key = w.key
      JOIN {LIMITS_SQL} ON l.type = s.type
), due AS (
    SELECT d.id FROM room, LATERAL (
        SELECT id FROM jobs
         WHERE status = 'queued' AND dispatched_at IS NULL AND type = room.type AND concurrency_key = room.key
           AND next_run_at <= now()
         ORDER BY priority DESC, next_run_at, id LIMIT room.n FOR UPDATE SKIP LOCKED
    ) d
)
UPDATE jobs j SET dispatched_at = now() FROM due WHERE j.id = due.id RETURNING j.id, j.attempt, j.priority, j.tenant_id
"""


def _bells(records: Sequence[Any]) -> list[Bell]:
    return [Bell(r["id"], r["attempt"], r["priority"], r["tenant_id"]) for r in records]


async def wake(db: Database, tenants: Sequence[str], capacity: Capacity, *, batch: int) -> list[Bell]:
    """Jobs that wait for a slot of one of `tenants`, as many as each has room for now, marked dispatched: the
    caller rings them. For the worker whose job just gave a slot back (the sweep finds the rest)."""
    values = {"tenants": sorted(set(tenants)), "default_cap": capacity.default_cap, "batch": batch}
    return _bells(await sql.fetch_all(db, _WAKE, {**values, **limit_values(capacity.limits)}))


async def wake_keys(db: Database, keys: Sequence[tuple[str, str]], capacity: Capacity, *, batch: int) -> list[Bell]:
    """Jobs that wait for a slot of one of `keys` (job type, concurrency key), as many as each has room for now,
    marked dispatched: the caller rings them."""
    values = {"types": [t for t, _ in keys], "keys": [k for _, k in keys], "batch": batch}
    return _bells(await sql.fetch_all(db, _WAKE_KEYS, {**values, **limit_values(capacity.limits)}))


# -- `outlast tenants` --------------------------------------------------------------------------------


class TenantInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    max_running: int | None  # None: the deployment's default
    running: int  # jobs running now that took one of its slots
    created_at: datetime


async def tenants(db: Database) -> list[TenantInfo]:
    query = "SELECT id, max_running, running, created_at FROM tenants ORDER BY id"
    return [msgspec.convert(dict(r), TenantInfo) for r in await sql.fetch_all(db, query)]


async def set_limit(db: Database, tenant: str, max_running: int | None) -> bool:
    """Set the tenant's cap (None: back to the default). False: no such tenant."""
    query = "UPDATE tenants SET max_running = :n WHERE id = :tenant RETURNING id"
    return await sql.fetch_val(db, query, {"n": max_running, "tenant": tenant}) is not None
