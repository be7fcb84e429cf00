"""`outlast jobs list|get|wait|watch|result|cancel|retry` and `outlast types`: the operator's view of the jobs.

Like `outlast keys`, these work on the stores directly (DATABASE_URL and REDIS_URL, or those of the `make run` up in
this checkout), not through the HTTP API: no key needed, every tenant in sight unless `--tenant` names one. A change
(cancel, retry) goes through the same engine functions as the API's routes (worker/control.py).

`--json` makes every command print JSON for scripts: one document, or JSON lines for `list` and `watch`. Otherwise
tables and live progress bars (worker/tools/views.py), on stderr for the live views.

Exit codes: 0 done (and for `wait` and `result`: the job succeeded); 1 the command could not run (no stores, a
store unreachable, a bad value); 2 bad usage; 3 no such job; 4 the job is not in a state for that (cancel a job
that has ended, retry one that has not failed, the result of one not finished); `wait` and `result` of a job that
ended otherwise: 10 failed, 11 cancelled, 12 expired; 130 interrupted (Ctrl-C) during `wait`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final, get_args
from uuid import UUID

import asyncpg
import msgspec
from databases import Database

from worker import Config, Deps, Job, Status, connect, control, database, events, from_env, resource, store, workflows
from worker.connections import tls
from worker.database import open_database
from worker.job import JobType
from worker.job_types import describe, load
from worker.queue import Bell, enqueue_many
from worker.tools import tail, views

NO_SUCH_JOB: Final = 3
NOT_NOW: Final = 4
INTERRUPTED: Final = 130
OUTCOME: Final[Mapping[str, int]] = {"succeeded": 0, "failed": 10, "cancelled": 11, "expired": 12}
DATABASE: Final = ("DATABASE_URL",)
BOTH: Final = ("DATABASE_URL", "REDIS_URL")  # a change rings the doorbell; a wait listens for it
_encode = msgspec.json.Encoder().encode


class OperatorJob(Job, frozen=True, kw_only=True):
    """The Job as the API shows it, and whose it is: an operator sees every tenant's."""

    tenant: str


class Refused(Exception):
    """One line for stderr, and the exit code that says why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def operator_job(row: store.JobRow) -> OperatorJob:
    return OperatorJob(**msgspec.structs.asdict(resource.as_job(row)), tenant=row.tenant_id)


def shown(row: store.JobRow) -> dict[str, Any]:
    """The job as the views take it: JSON builtins."""
    job: dict[str, Any] = msgspec.json.decode(_encode(operator_job(row)))
    return job


def emit(value: Any) -> None:
    """One JSON document (or line) on stdout."""
    sys.stdout.buffer.write(_encode(value) + b"\n")
    sys.stdout.flush()


@contextlib.asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Database]:
    db = open_database(config)
    await db.connect()
    try:
        yield db
    finally:
        await db.disconnect()


async def find(db: Database, args: argparse.Namespace) -> store.JobRow:
    """The job named by `args.id` (of `args.tenant`, when given), or Refused with NO_SUCH_JOB."""
    scope = f" of tenant {args.tenant!r}" if args.tenant else ""
    try:
        job_id = UUID(args.id)
    except ValueError:
        raise Refused(f"no job {args.id!r}{scope}: a job id is a UUID", NO_SUCH_JOB) from None
    row = await store.get_job(db, args.tenant, job_id)
    if row is None:
        raise Refused(f"no job {args.id}{scope}", NO_SUCH_JOB)
    return row


def job_types(config: Config) -> Mapping[str, JobType]:
    """The types this deployment registers, found as `make run` finds them: the working directory is importable."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load(config.job_modules)
    except (ImportError, RuntimeError) as exc:
        raise SystemExit(f"OUTLAST_JOB_MODULES={config.job_modules!r}: {exc}") from None


# -- reads -------------------------------------------------------------------------------------------


async def cmd_list(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as db:
        rows = await store.list_jobs(db, args.tenant, limit=args.limit, status=args.status, type=args.type)
    if args.json:
        for row in rows:
            emit(operator_job(row))
    elif rows:
        out = views.console()
        out.print(views.jobs_table((shown(row) for row in rows), bars=out.is_terminal))
    else:
        print("no jobs" + (f" of tenant {args.tenant!r}" if args.tenant else ""), file=sys.stderr)
    return 0


async def cmd_get(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as db:
        row = await find(db, args)
    if args.json:
        emit(operator_job(row))
    else:
        views.console().print(views.job_panel(shown(row)))
    return 0


async def cmd_result(args: argparse.Namespace, config: Config) -> int:
    async with opened(config) as db:
        row = await find(db, args)
    if not row.done:
        raise Refused(f"{row.id} is {row.status}: no result yet (outlast jobs wait {row.id})", NOT_NOW)
    if row.status != "succeeded":
        error = resource.as_job(row).error
        why = f": {error.type}: {error.message}" if error else ""
        raise Refused(f"{row.id} {row.status}{why}", OUTCOME[row.status])
    if row.result is None:
        raise Refused(f"the result of {row.id} was deleted after the retention period", NOT_NOW)
    if args.output:
        try:
            await asyncio.to_thread(Path(args.output).write_text, row.result)
        except OSError as exc:
            raise SystemExit(f"cannot write {args.output}: {exc.strerror}") from None
        print(f"wrote the result of {row.id} ({len(row.result.encode())} bytes) to {args.output}", file=sys.stderr)
    elif args.json or not sys.stdout.isatty():
        print(row.result)  # the JSON exactly as stored
    else:
        views.console().print_json(row.result)
    return 0


async def cmd_types(args: argparse.Namespace, config: Config) -> int:
    found = describe(job_types(config), config.default_max_attempts)
    if args.json:
        emit({"items": found})  # the shape of GET /v1/job-types
    else:
        views.console().print(views.types_table(msgspec.to_builtins(found)))
    return 0


# -- changes -----------------------------------------------------------------------------------------


async def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    async with connect(config) as deps:
        row = await find(deps.db, args)
        after = await control.cancel(deps, row.tenant_id, row.id)
        if after is None:  # it ended meanwhile, or had ended
            now = await store.get_job(deps.db, None, row.id) or row
            raise Refused(f"{row.id} is already {now.status}: nothing to cancel", NOT_NOW)
    if args.json:
        emit(operator_job(after))
    elif after.status == "cancelled":
        print(f"cancelled {after.id}", file=sys.stderr)
    else:
        print(f"asked {after.id} to stop: it ends cancelled, unless it finishes first", file=sys.stderr)
    return 0


async def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    async with connect(config) as deps:
        original = await find(deps.db, args)
        if original.workflow_id is not None and original.status in control.RETRYABLE:
            try:  # the workflow resumes from there, as through the API
                row, bells = await workflows.resume_from(
                    deps.db, original.tenant_id, original.id, ttl_s=config.job_ttl_s
                )
            except workflows.NotResumable as exc:
                raise Refused(f"{original.id}: {exc}", NOT_NOW) from None
        else:
            try:
                job = control.retry_job(original, original.tenant_id, job_types(config), ttl_s=config.job_ttl_s)
            except control.NotRetryable as exc:
                raise Refused(f"{original.id}: {exc}", NOT_NOW) from None
            except control.TypeGone as exc:
                raise Refused(f"{exc} (here: OUTLAST_JOB_MODULES={config.job_modules!r})", NOT_NOW) from None
            [inserted] = await store.insert_jobs(deps.db, [job])
            assert inserted is not None  # no Idempotency-Key: nothing to conflict with
            row, bells = inserted, [Bell(inserted.id, inserted.attempt)]
        if not await enqueue_many(deps.redis, bells):
            await store.undispatch_many(deps.db, [(b.job_id, b.started) for b in bells])  # the rows are the outbox
    if args.json:
        emit(operator_job(row))
    else:
        print(f"retrying {original.id} ({original.status}) as a new job of tenant {row.tenant_id}:", file=sys.stderr)
        print(row.id)  # alone on stdout: NEW=$(outlast jobs retry ID)
    return 0


# -- following ---------------------------------------------------------------------------------------


def event_data(row: store.JobRow, event: events.Event) -> Any:
    """An event's data as a stream shows it: a status event is the Job as it was right after the change."""
    if event.name == "status":
        return msgspec.json.decode(_encode(resource.status_job(row, event.data)))
    return msgspec.json.decode(event.data)


async def follow_job(
    deps: Deps, config: Config, row: store.JobRow, *, after: int, each: Callable[[int, str, Any], None]
) -> store.JobRow:
    """Hand each event of the job after seq `after` to `each`, until it has ended; return it as it ended."""
    async with tail.Doorbell(config.redis_url, {row.id}, timeout_s=config.redis_timeout_s, tls=tls(config)) as bell:
        try:
            async for event in tail.follow(deps.db, bell, row.id, after=after):
                each(event.seq, event.name, event_data(row, event))
        except tail.JobGone:
            raise Refused(f"{row.id} was deleted while it was followed", NO_SUCH_JOB) from None
    return await store.get_job(deps.db, None, row.id) or row


async def cmd_wait(args: argparse.Namespace, config: Config) -> int:
    async with connect(config) as deps:
        row = await find(deps.db, args)
        after = (await events.latest_seqs(deps.db, [row.id])).get(row.id, 0)
        row = await store.get_job(deps.db, None, row.id) or row  # as of `after` or later: the log has what follows
        screen = None if args.json and not sys.stderr.isatty() else views.JobScreen(shown(row))
        try:
            if not row.done:
                each = (lambda seq, name, data: screen.event(name, data)) if screen else (lambda *event: None)
                row = await follow_job(deps, config, row, after=after, each=each)
        finally:
            if screen:
                screen.close()
    if args.json:
        emit(operator_job(row))
    else:
        print(views.ended_line(shown(row)))
    return OUTCOME[row.status]


async def cmd_watch(args: argparse.Namespace, config: Config) -> int:
    if args.id is None:
        return await watch_all(args, config)
    async with connect(config) as deps:
        row = await find(deps.db, args)
        if args.json:  # the job's events as its stream carries them, one JSON line each
            await follow_job(deps, config, row, after=0, each=lambda *event: emit(_frame(*event)))
            return 0
        screen = views.JobScreen(shown(row))
        try:
            row = await follow_job(deps, config, row, after=0, each=lambda seq, name, data: screen.event(name, data))
        finally:
            screen.close()
    print(views.ended_line(shown(row)))
    return 0


def _frame(seq: int, name: str, data: Any) -> dict[str, Any]:
    return {"id": seq, "event": name, "data": data}


BOARD_REDRAW_S: Final = 0.25  # however busy the deployment, at most this many redraws a second


async def live_jobs(db: Database, args: argparse.Namespace) -> tuple[list[store.JobRow], bool]:
    """Running jobs first, then queued ones: at most `args.limit`, and whether there are more."""
    found: list[store.JobRow] = []
    for status in ("running", "queued"):
        found += await store.list_jobs(
            db, args.tenant, limit=args.limit + 1 - len(found), status=status, type=args.type
        )
        if len(found) > args.limit:
            break
    return found[: args.limit], len(found) > args.limit


class Board:
    """What `watch` without an id shows: the live jobs, redrawn in place, and each as it ends; or with --json, a
    JSON line for each job whenever it changes and when it ends."""

    def __init__(self, *, as_json: bool) -> None:
        self.screen = None if as_json else views.BoardScreen()
        self.seen: dict[UUID, tuple[str, int, str]] = {}  # what was last shown of each live job

    async def refresh(self, db: Database, args: argparse.Namespace) -> bool:
        """Show the jobs live now, and those that ended since; False when none is live."""
        rows, more = await live_jobs(db, args)
        for job_id in self.seen.keys() - {row.id for row in rows}:
            del self.seen[job_id]
            ended = await store.get_job(db, None, job_id)
            if ended is not None and ended.done:
                self.ended(ended)
        for row in rows:
            state = (row.status, row.attempt, row.progress)
            if self.screen is None and self.seen.get(row.id) != state:
                emit(operator_job(row))
            self.seen[row.id] = state
        if self.screen is not None:
            self.screen.show([shown(row) for row in rows], more=more)
        return bool(rows)

    def ended(self, row: store.JobRow) -> None:
        if self.screen is None:
            emit(operator_job(row))
        else:
            self.screen.ended(shown(row))

    def close(self) -> None:
        if self.screen is not None:
            self.screen.close()


async def watch_all(args: argparse.Namespace, config: Config) -> int:
    """Every live job (of --tenant, of --type) until none is left."""
    board = Board(as_json=args.json)
    async with (
        connect(config) as deps,
        tail.Doorbell(config.redis_url, None, timeout_s=config.redis_timeout_s, tls=tls(config)) as bell,
    ):
        try:
            while True:
                bell.clear()
                if not await board.refresh(deps.db, args):
                    break
                await asyncio.sleep(BOARD_REDRAW_S)
                await bell.wait()
        finally:
            board.close()
    print("no job is queued or running" + (f" of tenant {args.tenant!r}" if args.tenant else ""), file=sys.stderr)
    return 0


# -- the command line --------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Config], Coroutine[Any, Any, int]]
COMMANDS: Final[Mapping[str, tuple[Command, tuple[str, ...]]]] = {
    "list": (cmd_list, DATABASE),
    "get": (cmd_get, DATABASE),
    "result": (cmd_result, DATABASE),
    "wait": (cmd_wait, BOTH),
    "watch": (cmd_watch, BOTH),
    "cancel": (cmd_cancel, BOTH),
    "retry": (cmd_retry, BOTH),
    "types": (cmd_types, ()),
}


def run(args: argparse.Namespace) -> int:
    """Run `outlast jobs ...` or `outlast types`: its exit code, and one line on stderr for anything that stops it."""
    command, needs = COMMANDS[args.jobs_command if args.command == "jobs" else "types"]
    config = from_env(needs=needs)
    try:
        return asyncio.run(command(args, config))
    except Refused as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0 if args.command == "jobs" and args.jobs_command == "watch" else INTERRUPTED
    except BrokenPipeError:  # `... --json | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush has nowhere to fail
        return 0
    except asyncpg.UndefinedTableError:
        raise SystemExit("the database has no Outlast tables yet: run `outlast migrate`") from None
    except database.UNAVAILABLE as exc:
        raise SystemExit(f"cannot reach the database: {exc}") from None


def add_parsers(sub: Any) -> None:
    """`jobs` and `types`, on the `outlast` command's subparsers."""
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="JSON for scripts (JSON lines for list and watch)")
    scoped = argparse.ArgumentParser(add_help=False, parents=[json_flag])
    scoped.add_argument("--tenant", help="only this tenant's jobs (default: every tenant's)")
    one = argparse.ArgumentParser(add_help=False, parents=[scoped])
    one.add_argument("id", help="the job's id")

    sub.add_parser("types", parents=[json_flag], help="the job types this deployment registers")
    jobs = sub.add_parser("jobs", help="jobs in the stores: list, get, wait, watch, result, cancel, retry")
    commands = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = commands.add_parser("list", parents=[scoped], help="jobs, newest first")
    listing.add_argument("--status", choices=get_args(Status))
    listing.add_argument("--type", help="only jobs of this type")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    commands.add_parser("get", parents=[one], help="one job, every field")
    commands.add_parser("wait", parents=[one], help="until the job ends: exit 0 if it succeeded (exit codes: below)")
    watch = commands.add_parser("watch", parents=[scoped], help="live progress of a job, or of every live job")
    watch.add_argument("id", nargs="?", help="the job (default: every queued or running job)")
    watch.add_argument("--type", help="without an id: only jobs of this type")
    watch.add_argument("--limit", type=int, default=20, help="without an id: show at most this many (default 20)")
    result = commands.add_parser("result", parents=[one], help="a succeeded job's result (JSON)")
    result.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead")
    commands.add_parser("cancel", parents=[one], help="cancel a queued job, or ask a running one to stop")
    commands.add_parser("retry", parents=[one], help="a new job from a failed, cancelled or expired one")
    jobs.epilog = "exit codes: " + __doc__.split("Exit codes: ", 1)[1].replace("\n", " ")
