"""Cron schedules: declared in code (a job module's SCHEDULES) or through /v1/schedules, and the statements on their
table (migrations/0010_schedules.sql). The ticker that turns their ticks into jobs is worker/ticker.py.

A schedule belongs to a tenant; one declared in code belongs to `default` unless it names another. The code owns a
declared schedule's definition: each worker's start writes what SCHEDULES says (cron, time zone, type, input,
metadata) and deletes the declared schedules no module declares any more, while pausing, resuming and triggering
stay open to the API and the CLI.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from databases import Database

from worker import sql
from worker.cron import Cron
from worker.job import JobType
from worker.keys import TENANT

DEFAULT_TENANT = "default"
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # as the table's CHECK: it goes in a URL path as it is
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A cron schedule a job module declares in `SCHEDULES = [Schedule(...)]`: every tick of `cron` in `timezone`
    makes one job of `type` with `input` and `metadata`."""

    id: str
    cron: str
    type: str
    input: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    metadata: Mapping[str, Any] = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT


class Definition(msgspec.Struct, frozen=True, kw_only=True):
    """What a schedule is, checked: its cron and time zone parse, its input is valid for its type (and encoded as the
    type's Input encodes it)."""

    tenant: str
    id: str
    cron: Cron
    type: str
    input: bytes  # JSON
    metadata: bytes  # JSON


class ScheduleRow(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    id: str
    cron: str
    timezone: str
    type: str
    input: str
    metadata: str
    declared: bool
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_job_id: UUID | None

    @property
    def schedule(self) -> Cron:
        return Cron(self.cron, self.timezone)


class ScheduleResource(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule as /v1/schedules shows it. `declared`: from a job module's SCHEDULES, so only `paused` may change."""

    id: str
    cron: str
    timezone: str
    type: str
    input: msgspec.Raw
    metadata: dict[str, Any]
    paused: bool
    declared: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_job_id: UUID | None


def as_resource(row: ScheduleRow) -> ScheduleResource:
    return ScheduleResource(
        id=row.id,
        cron=row.cron,
        timezone=row.timezone,
        type=row.type,
        input=msgspec.Raw(row.input.encode()),
        metadata=msgspec.json.decode(row.metadata),
        paused=row.paused,
        declared=row.declared,
        next_run_at=row.next_run_at,
        last_run_at=row.last_run_at,
        last_job_id=row.last_job_id,
    )


def _row(record: Any) -> ScheduleRow:
    return msgspec.convert(dict(record), ScheduleRow)


# -- declared in code -------------------------------------------------------------------------------


def declared(modules: str, job_types: Mapping[str, JobType]) -> list[Definition]:
    """The SCHEDULES of `modules` (OUTLAST_JOB_MODULES), checked; a bad one stops the worker's start, naming it."""
    found: list[Definition] = []
    for name in filter(None, (m.strip() for m in modules.split(","))):
        for schedule in getattr(importlib.import_module(name), "SCHEDULES", ()):
            if not isinstance(schedule, Schedule):
                raise RuntimeError(f"{name}.SCHEDULES holds {schedule!r}, not a worker.Schedule")
            try:
                found.append(_checked(schedule, job_types))
            except (ValueError, msgspec.ValidationError) as exc:
                raise RuntimeError(f"schedule {schedule.id!r} of {name}: {exc}") from None
    ids = [(d.tenant, d.id) for d in found]
    if twice := sorted({f"{tenant}/{id}" for tenant, id in ids if ids.count((tenant, id)) > 1}):
        raise RuntimeError(f"schedules declared twice: {', '.join(twice)}")
    return found


def _checked(schedule: Schedule, job_types: Mapping[str, JobType]) -> Definition:
    if not re.fullmatch(ID_PATTERN, schedule.id):
        raise ValueError("an id is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not TENANT.fullmatch(schedule.tenant):
        raise ValueError(f"tenant {schedule.tenant!r} is not a tenant's name")
    job_type = job_types.get(schedule.type)
    if job_type is None:
        raise ValueError(f"unknown job type {schedule.type!r}")
    value = job_type.decoder.decode(_encode(schedule.input))
    return Definition(
        tenant=schedule.tenant,
        id=schedule.id,
        cron=Cron.parse(schedule.cron, schedule.timezone),
        type=schedule.type,
        input=_encode(value),
        metadata=_encode(schedule.metadata),
    )


# -- the statements ---------------------------------------------------------------------------------

COLUMNS = (
    "tenant_id, id, cron, timezone, type, input, metadata, declared, paused, next_run_at, last_run_at, last_job_id"
)
_NOW = "SELECT now()"


async def now(db: Database) -> datetime:
    """The database's clock, which every next run is computed from: web and worker clocks may drift."""
    moment: datetime = await sql.fetch_val(db, _NOW)
    return moment


_CREATE = f"""
INSERT INTO schedules (tenant_id, id, cron, timezone, type, input, metadata, paused, next_run_at)
VALUES (:tenant, :id, :cron, :timezone, :type, CAST(:input AS jsonb), CAST(:metadata AS jsonb), :paused, :next_run_at)
ON CONFLICT (tenant_id, id) DO NOTHING
RETURNING {COLUMNS}
"""


def _values(definition: Definition) -> dict[str, Any]:
    return {
        "tenant": definition.tenant,
        "id": definition.id,
        "cron": definition.cron.expression,
        "timezone": definition.cron.timezone,
        "type": definition.type,
        "input": definition.input.decode(),
        "metadata": definition.metadata.decode(),
    }


async def create(db: Database, definition: Definition, *, paused: bool = False) -> ScheduleRow | None:
    """A new schedule, its first run the first tick from now. None: the tenant has a schedule of that id."""
    next_run_at = None if paused else definition.cron.after(await now(db))
    record = await sql.fetch_one(db, _CREATE, {**_values(definition), "paused": paused, "next_run_at": next_run_at})
    return None if record is None else _row(record)


_GET = f"SELECT {COLUMNS} FROM schedules WHERE tenant_id = :tenant AND id = :id"


async def get(db: Database, tenant: str, schedule_id: str, *, lock: bool = False) -> ScheduleRow | None:
    """The schedule; with `lock`, locked until the transaction ends (a trigger: a tick of it waits)."""
    record = await sql.fetch_one(db, _GET + (" FOR UPDATE" if lock else ""), {"tenant": tenant, "id": schedule_id})
    return None if record is None else _row(record)


_LIST = f"""
SELECT {COLUMNS} FROM schedules
 WHERE (tenant_id = CAST(:tenant AS text) OR CAST(:tenant AS text) IS NULL) AND id > :after
 ORDER BY id, tenant_id LIMIT :limit
"""


async def list_schedules(db: Database, tenant: str | None, *, limit: int, after: str = "") -> list[ScheduleRow]:
    """The tenant's schedules (None: every tenant's) by id, those after `after` (the last id of the page before)."""
    records = await sql.fetch_all(db, _LIST, {"tenant": tenant, "after": after, "limit": limit})
    return [_row(r) for r in records]


_REDEFINE = f"""
UPDATE schedules
   SET cron = :cron, timezone = :timezone, type = :type, input = CAST(:input AS jsonb),
       metadata = CAST(:metadata AS jsonb), paused = :paused,
       -- a cron or time zone of its own, or the end of a pause: the next run is the first tick from now; a tick
       -- missed while paused is not run
       next_run_at = CASE WHEN :paused THEN NULL
                          WHEN paused OR cron <> :cron OR timezone <> :timezone THEN :next_run_at
                          ELSE next_run_at END,
       updated_at = now()
 WHERE tenant_id = :tenant AND id = :id
RETURNING {COLUMNS}
"""


async def redefine(db: Database, definition: Definition, *, paused: bool) -> ScheduleRow | None:
    """Write the schedule's definition and pause state (PATCH). None: no such schedule."""
    values = {**_values(definition), "paused": paused, "next_run_at": definition.cron.after(await now(db))}
    record = await sql.fetch_one(db, _REDEFINE, values)
    return None if record is None else _row(record)


async def set_paused(db: Database, tenant: str, schedule_id: str, paused: bool) -> ScheduleRow | None:
    """Pause, or resume from the first tick from now. None: no such schedule."""
    row = await get(db, tenant, schedule_id)
    if row is None:
        return None
    definition = Definition(
        tenant=row.tenant_id,
        id=row.id,
        cron=row.schedule,
        type=row.type,
        input=row.input.encode(),
        metadata=row.metadata.encode(),
    )
    return await redefine(db, definition, paused=paused)


_DELETE = "DELETE FROM schedules WHERE tenant_id = :tenant AND id = :id AND NOT declared RETURNING id"


async def delete(db: Database, tenant: str, schedule_id: str) -> bool:
    """Delete a schedule made through the API. False: none such (a declared one is deleted from its module)."""
    return await sql.fetch_val(db, _DELETE, {"tenant": tenant, "id": schedule_id}) is not None


_SYNC_TENANTS = "INSERT INTO tenants (id) SELECT DISTINCT unnest(CAST(:tenants AS text[])) ON CONFLICT DO NOTHING"
_SYNC = f"""
WITH declared AS (
    SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:crons AS text[]),
                         CAST(:timezones AS text[]), CAST(:types AS text[]), CAST(:inputs AS jsonb[]),
                         CAST(:metadata AS jsonb[]), CAST(:next_runs AS timestamptz[]))
           AS d(tenant_id, id, cron, timezone, type, input, metadata, next_run_at)
), gone AS (  -- declared by no module any more
    DELETE FROM schedules s WHERE s.declared AND (s.tenant_id, s.id) NOT IN (SELECT tenant_id, id FROM declared)
)
INSERT INTO schedules (tenant_id, id, cron, timezone, type, input, metadata, declared, next_run_at)
SELECT tenant_id, id, cron, timezone, type, input, metadata, true, next_run_at FROM declared
ON CONFLICT (tenant_id, id) DO UPDATE
   SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, type = EXCLUDED.type, input = EXCLUDED.input,
       metadata = EXCLUDED.metadata, declared = true,
       -- the same cron as before keeps its next run, so a tick missed while no worker ran still runs (once)
       next_run_at = CASE WHEN schedules.paused THEN NULL
                          WHEN schedules.cron = EXCLUDED.cron AND schedules.timezone = EXCLUDED.timezone
                          THEN schedules.next_run_at
                          ELSE EXCLUDED.next_run_at END,
       updated_at = now()
RETURNING {COLUMNS}
"""


async def sync_declared(db: Database, definitions: Sequence[Definition]) -> list[ScheduleRow]:
    """Make the declared schedules in the table what `definitions` says (a worker's start): new ones added, changed
    ones rewritten (their pause kept), the ones no module declares any more deleted."""
    moment = await now(db)
    values = {
        "tenants": [d.tenant for d in definitions],
        "ids": [d.id for d in definitions],
        "crons": [d.cron.expression for d in definitions],
        "timezones": [d.cron.timezone for d in definitions],
        "types": [d.type for d in definitions],
        "inputs": [d.input.decode() for d in definitions],
        "metadata": [d.metadata.decode() for d in definitions],
        "next_runs": [d.cron.after(moment) for d in definitions],
    }
    async with db.transaction():
        await sql.execute(db, _SYNC_TENANTS, {"tenants": values["tenants"]})
        return [_row(r) for r in await sql.fetch_all(db, _SYNC, values)]


# -- ticks ------------------------------------------------------------------------------------------

_DUE = f"""
SELECT {COLUMNS} FROM schedules WHERE next_run_at <= :now
 ORDER BY next_run_at LIMIT :batch FOR UPDATE SKIP LOCKED
"""


async def take_due(db: Database, *, now: datetime, batch: int) -> list[ScheduleRow]:
    """Schedules due at `now`, locked until the transaction ends; another ticker's pass skips them meanwhile, and
    finds them advanced once it commits. Inside a transaction only."""
    return [_row(r) for r in await sql.fetch_all(db, _DUE, {"now": now, "batch": batch})]


class Advance(msgspec.Struct, frozen=True):
    """A schedule's run: the tick that made `job_id` (None: made no job), and its next tick."""

    tenant: str
    id: str
    tick: datetime | None
    next_run_at: datetime | None
    job_id: UUID | None


_ADVANCE = """
UPDATE schedules s
   SET next_run_at = w.next_run_at, last_run_at = COALESCE(w.tick, s.last_run_at),
       last_job_id = COALESCE(w.job_id, s.last_job_id)
  FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:ticks AS timestamptz[]),
              CAST(:next_runs AS timestamptz[]), CAST(:jobs AS uuid[])) AS w(tenant_id, id, tick, next_run_at, job_id)
 WHERE s.tenant_id = w.tenant_id AND s.id = w.id
"""


async def advance(db: Database, runs: Sequence[Advance]) -> None:
    """Record each run, in one statement: on rows this transaction locked (take_due, or get with lock)."""
    values = {
        "tenants": [r.tenant for r in runs],
        "ids": [r.id for r in runs],
        "ticks": [r.tick for r in runs],
        "next_runs": [r.next_run_at for r in runs],
        "jobs": [r.job_id for r in runs],
    }
    await sql.execute(db, _ADVANCE, values)


_DUE_IN = "SELECT EXTRACT(EPOCH FROM min(next_run_at) - now()) FROM schedules"


async def due_in(db: Database) -> float | None:
    """Seconds until the earliest next tick of any schedule (negative: one is due). None: nothing will run."""
    seconds = await sql.fetch_val(db, _DUE_IN)
    return None if seconds is None else float(seconds)
