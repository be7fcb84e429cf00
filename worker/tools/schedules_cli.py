"""`outlast schedules list|pause|resume|trigger`: the cron schedules in DATABASE_URL, for an operator (the API's
/v1/schedules is the tenant's own view). `trigger` also rings Redis, as a submit does."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from databases import Database

from worker import connect, cron, schedules, ticker
from worker.config import from_env
from worker.database import open_database
from worker.job_types import load

T = TypeVar("T")
LIST_LIMIT = 10_000


async def _with_database(call: Callable[[Database], Awaitable[T]]) -> T:
    db = open_database(from_env(needs=("DATABASE_URL",)))
    await db.connect()
    try:
        return await call(db)
    finally:
        await db.disconnect()


def _local(moment: datetime | None, timezone: str) -> str:
    """A time as the schedule's clock shows it, with the zone's abbreviation (CET, CEST)."""
    return "-" if moment is None else f"{moment.astimezone(cron.zone(timezone)):%Y-%m-%d %H:%M %Z}"


def cmd_list(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_database(lambda db: schedules.list_schedules(db, args.tenant, limit=LIST_LIMIT)))
    table = [("tenant", "id", "cron", "timezone", "type", "state", "next run", "last run", "last job")]
    for row in rows:
        table.append(
            (
                row.tenant_id,
                row.id + (" (code)" if row.declared else ""),
                row.cron,
                row.timezone,
                row.type,
                "paused" if row.paused else "active",
                _local(row.next_run_at, row.timezone),
                _local(row.last_run_at, row.timezone),
                str(row.last_job_id or "-"),
            )
        )
    widths = [max(len(line[n]) for line in table) for n in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(no schedules)", file=sys.stderr)
    return 0


def _set_paused(args: argparse.Namespace, paused: bool) -> int:
    row = asyncio.run(_with_database(lambda db: schedules.set_paused(db, args.tenant, args.id, paused)))
    if row is None:
        print(f"no schedule {args.id!r} of tenant {args.tenant!r}", file=sys.stderr)
        return 1
    if paused:
        print(f"paused {args.tenant}/{row.id}: no tick makes a job until it is resumed", file=sys.stderr)
    else:
        print(f"resumed {args.tenant}/{row.id}: next run {_local(row.next_run_at, row.timezone)}", file=sys.stderr)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _set_paused(args, True)


def cmd_resume(args: argparse.Namespace) -> int:
    return _set_paused(args, False)


def cmd_trigger(args: argparse.Namespace) -> int:
    config = from_env()

    async def run() -> Any:
        async with connect(config) as deps:
            return await ticker.trigger(deps, load(config.job_modules), args.tenant, args.id)

    try:
        made = asyncio.run(run())
    except LookupError as exc:
        raise SystemExit(f"no job type {exc.args[0]!r} is registered (OUTLAST_JOB_MODULES)") from None
    if made is None:
        print(f"no schedule {args.id!r} of tenant {args.tenant!r}", file=sys.stderr)
        return 1
    row, job = made
    print(f"triggered {args.tenant}/{row.id}: job {job.id} ({job.type}) is queued", file=sys.stderr)
    print(json.dumps({"id": str(job.id), "type": job.type, "status": job.status}))
    return 0


def register(sub: Any) -> None:
    """Add `schedules` to the `outlast` parser's subcommands."""
    parser = sub.add_parser("schedules", help="cron schedules in DATABASE_URL: list, pause, resume, trigger")
    commands = parser.add_subparsers(dest="schedules_command", required=True)
    listing = commands.add_parser("list", help="every schedule: its cron, zone, state, next and last run")
    listing.add_argument("--tenant", help="only this tenant's (default: every tenant's)")
    for name, run, text in (
        ("pause", cmd_pause, "pause ID: its ticks make no job until it is resumed"),
        ("resume", cmd_resume, "resume ID: it runs again from its first tick after now"),
        ("trigger", cmd_trigger, "make a job of ID now (its next tick stays); prints the job"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("id")
        command.add_argument("--tenant", default=schedules.DEFAULT_TENANT, help="whose schedule (default: default)")
        command.set_defaults(run=run)
    listing.set_defaults(run=cmd_list)


def main(args: argparse.Namespace) -> int:
    result: int = args.run(args)
    return result
