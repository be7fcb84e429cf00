"""The `outlast` command: run (everything, for development), migrate, web, worker, keys, tenants, submit, webhooks;
and jobs and types (worker/tools/jobs_cli.py), schedules (worker/tools/schedules_cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

from databases import Database

from worker import keys
from worker.config import STORES_FILE, Config, data_dir, from_env, running_stores
from worker.database import open_database
from worker.migrate import create_database, migrate
from worker.tools import jobs_cli, schedules_cli, workflows_cli
from worker.tools.api import request_json
from worker.tools.watch import follow

T = TypeVar("T")
DATABASE = ("DATABASE_URL",)  # what a command that only reads or writes the database needs
WEB = "{python} -m server --host {host}"  # the Procfile's web command; it reads $PORT
WORKER = "{python} -m arq worker.settings.WorkerSettings --custom-log-dict worker.logs.ARQ_LOG_CONFIG"


def _migrate(dsn: str) -> None:
    async def both() -> list[str]:
        await create_database(dsn)
        return await migrate(dsn)

    applied = asyncio.run(both())
    print("migrations: " + (", ".join(applied) if applied else "up to date"), file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> int:
    config = from_env(needs=DATABASE)
    _migrate(config.direct_database_url or config.database_url)  # past a pooler when we can, as worker.migrate
    return 0


def _exec(command: str) -> int:
    argv = shlex.split(command)
    os.execvp(argv[0], argv)  # the platform's signals reach uvicorn / arq directly


def cmd_web(args: argparse.Namespace) -> int:
    return _exec(WEB.format(python=sys.executable, host=args.host))


def cmd_worker(args: argparse.Namespace) -> int:
    return _exec(WORKER.format(python=sys.executable))


async def _with_database(call: Callable[[Database], Awaitable[T]], database_url: str | None = None) -> T:
    config = from_env(needs=DATABASE) if database_url is None else Config(database_url=database_url)
    db = open_database(config)
    await db.connect()
    try:
        return await call(db)
    finally:
        await db.disconnect()


def cmd_keys_create(args: argparse.Namespace) -> int:
    try:
        key = asyncio.run(_with_database(lambda db: keys.create(db, args.tenant, args.name, read_only=args.read_only)))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    what = "A new read-only API key" if args.read_only else "A new API key"
    print(f"{what} for tenant {args.tenant!r}. It is shown this once and stored only as a hash:", file=sys.stderr)
    print(key, flush=True)  # alone on the last line of stdout: KEY=$(outlast keys create acme)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    found = asyncio.run(_with_database(lambda db: keys.list_keys(db, args.tenant)))
    print(f"{'id':<12}  {'tenant':<20}  {'access':<10}  {'created':<20}  {'last used':<20}  {'revoked':<20}  name")
    day = "%Y-%m-%d %H:%M:%S"
    for k in found:
        used = k.last_used_at.strftime(day) if k.last_used_at else "-"
        revoked = k.revoked_at.strftime(day) if k.revoked_at else "-"
        access = "read-only" if k.read_only else "read-write"
        created = k.created_at.strftime(day)
        print(f"{k.id:<12}  {k.tenant:<20}  {access:<10}  {created:<20}  {used:<20}  {revoked:<20}  {k.name}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    if not asyncio.run(_with_database(lambda db: keys.revoke(db, args.key))):
        print(f"no usable key {args.key!r} (unknown, or already revoked)", file=sys.stderr)
        return 1
    print(f"revoked {keys.key_id(args.key) or args.key}: it answers 401 from now on", file=sys.stderr)
    return 0


def cmd_tenants_list(args: argparse.Namespace) -> int:
    from worker.capacity import tenants

    found = asyncio.run(_with_database(tenants))
    print(f"{'tenant':<24}  {'running':>7}  {'max running':<22}  created")
    for t in found:
        cap = "default share" if t.max_running is None else str(t.max_running)
        print(f"{t.id:<24}  {t.running:>7}  {cap:<22}  {t.created_at:%Y-%m-%d %H:%M:%S}")
    return 0


def cmd_tenants_limit(args: argparse.Namespace) -> int:
    from worker.capacity import set_limit

    if args.max_running == "default":
        limit = None
    elif args.max_running.isdigit():
        limit = int(args.max_running)
    else:
        raise SystemExit(f"MAX_RUNNING is a number of jobs or `default`, not {args.max_running!r}")
    if not asyncio.run(_with_database(lambda db: set_limit(db, args.tenant, limit))):
        print(f"no tenant {args.tenant!r}", file=sys.stderr)
        return 1
    what = "the deployment's default share of worker slots" if limit is None else f"{limit} running jobs at once"
    print(f"tenant {args.tenant}: at most {what}", file=sys.stderr)
    return 0


def _dev_secret(data: Path) -> str:
    """The development token secret, generated once and kept under the data directory, so tokens outlive a restart."""
    path = data / "secret_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def cmd_run(args: argparse.Namespace) -> int:
    """Web + worker together; an embedded PostgreSQL / Valkey for whichever URL is not set. Ctrl-C stops everything
    and exits 0: stopping is what it was asked to do."""
    from honcho.manager import Manager

    env = dict(os.environ)
    data = data_dir(env)
    with contextlib.ExitStack() as stack:
        if not env.get("DATABASE_URL") or not env.get("REDIS_URL"):
            data.mkdir(parents=True, exist_ok=True)
            from worker.tools.embedded import EmbeddedPostgres, EmbeddedValkey
        if not env.get("DATABASE_URL"):
            postgres = stack.enter_context(EmbeddedPostgres(data / "postgres"))
            env["DATABASE_URL"] = postgres.dsn("outlast")
            # Our own database on this machine: the web may run open while no API key exists (it says so).
            env["OUTLAST_DEV_OPEN"] = "1"
            print(f"embedded PostgreSQL: {env['DATABASE_URL']} (data in {data / 'postgres'})", file=sys.stderr)
        if not env.get("REDIS_URL"):
            valkey = stack.enter_context(EmbeddedValkey(data / "valkey"))
            env["REDIS_URL"] = valkey.url()
            print(f"embedded Valkey: {env['REDIS_URL']} (append-only file in {data / 'valkey'})", file=sys.stderr)
        _migrate(env["DATABASE_URL"])
        if not env.get("OUTLAST_SECRET_KEY"):
            data.mkdir(parents=True, exist_ok=True)
            env["OUTLAST_SECRET_KEY"] = _dev_secret(data)
        # A job module in the directory `make run` was started from is importable (OUTLAST_JOB_MODULES=myjobs).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
        port = env.setdefault("PORT", "8000")
        url = f"http://127.0.0.1:{port}"
        stack.callback(_announce_stores(data, env, url))
        print(_banner(url, keyed=asyncio.run(_with_database(keys.any_active, env["DATABASE_URL"]))), file=sys.stderr)
        manager = Manager()
        manager.add_process("web", WEB.format(python=sys.executable, host="127.0.0.1"), env=env)
        manager.add_process("worker", WORKER.format(python=sys.executable), env=env)
        manager.loop()
    if manager.returncode in (130, 143):  # SIGINT (Ctrl-C) or SIGTERM: asked to stop, and stopped
        return 0
    return int(manager.returncode or 0)


def _announce_stores(data: Path, env: dict[str, str], url: str) -> Callable[[], None]:
    """Write .outlast/stores.env, so that every command run in this checkout meanwhile (`outlast keys`, `outlast
    jobs`, `arq --check`) finds these stores; the returned function removes it again."""
    path = data / STORES_FILE
    data.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(
        f"# written by `outlast run` while it runs (pid {os.getpid()}); removed when it stops\n"
        f"DATABASE_URL={env['DATABASE_URL']}\nREDIS_URL={env['REDIS_URL']}\nOUTLAST_URL={url}\n"
    )
    return lambda: path.unlink(missing_ok=True)


def _banner(url: str, *, keyed: bool) -> str:
    submit = """-d '{"type": "square_sum", "input": {"data": [1, 2, 3]}}'"""
    if keyed:
        auth = '-H "Authorization: Bearer $OUTLAST_API_KEY"'
        curl = f"  curl -si -X POST {url}/v1/jobs {auth} -H 'content-type: application/json' {submit}"
        keys_line = "  API keys exist: export OUTLAST_API_KEY=<yours> (or make one: outlast keys create default)"
    else:
        curl = f"  curl -si -X POST {url}/v1/jobs -H 'content-type: application/json' {submit}"
        keys_line = "  Running open (no API key yet). The first key closes it: outlast keys create default"
    return (
        f"\nOutlast on {url}  (API docs: {url}/docs; Ctrl-C stops everything)\n{curl}\n"
        f"  outlast submit sleep '{{\"seconds\": 5}}' --wait\n{keys_line}\n"
        f"  (every `outlast` command and `arq --check` in this directory finds these stores by itself)\n"
    )


def server_url(environ: Mapping[str, str] = os.environ) -> str:
    """$OUTLAST_URL, else the web of the `make run` up in this checkout, else the default port on this machine."""
    return environ.get("OUTLAST_URL") or running_stores(environ).get("OUTLAST_URL") or "http://127.0.0.1:8000"


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"INPUT is not JSON: {exc}") from None
    base = args.url.rstrip("/")
    body = {"type": args.type, "input": payload}
    when = {
        "run_at": args.at,
        "delay_s": args.delay,
        "priority": args.priority,
        "concurrency_key": args.concurrency_key,
    }
    body.update({name: value for name, value in when.items() if value is not None})  # the server checks each
    job = request_json(f"{base}/v1/jobs", key=args.key, body=body)
    if args.wait:
        job = follow(base, job)
    print(json.dumps(job, indent=2))
    return 0 if not args.wait or job["status"] == "succeeded" else 1


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Print the tenant's current signing secret (stdout); older ones still signing go to stderr."""
    from worker.webhooks.deliver import tenant_secrets

    config = from_env(needs=DATABASE)
    try:
        found = asyncio.run(tenant_secrets(config, args.tenant, rotate=args.rotate, overlap_s=args.overlap))
    except LookupError as exc:
        raise SystemExit(str(exc.args[0])) from None
    (current, _), older = found[0], found[1:]
    print(current)
    if current == config.webhook_secret:
        print(f"(OUTLAST_WEBHOOK_SECRET: no secret of {args.tenant}'s own; --rotate gives it one)", file=sys.stderr)
    for secret, expires_at in older:
        print(f"also signing until {expires_at:%Y-%m-%d %H:%M:%S %Z}: {secret}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="outlast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start everything for development (embedded stores when no URLs are set)")
    sub.add_parser("migrate", help="apply migrations/ to DATABASE_URL (the Procfile's release step)")
    web = sub.add_parser("web", help="run the HTTP server on $PORT")
    web.add_argument("--host", default="0.0.0.0", help="the address to listen on (default: all)")
    sub.add_parser("worker", help="run an arq worker")
    submit = sub.add_parser("submit", help="submit a job and print it")
    submit.add_argument("type")
    submit.add_argument("input", help="the job's input as JSON")
    submit.add_argument("--wait", action="store_true", help="follow its progress and log until the job is done")
    submit.add_argument("--at", metavar="RFC3339", help="not before then (run_at), e.g. 2026-12-24T18:00:00Z")
    submit.add_argument("--delay", type=float, metavar="SECONDS", help="not before this many seconds from now")
    submit.add_argument("--priority", type=int, help="-10..10: among due jobs, higher starts first (default 0)")
    submit.add_argument("--concurrency-key", help="shares its type's concurrency limit with the jobs of this key")
    submit.add_argument(
        "--url", default=server_url(), help="the web (default: $OUTLAST_URL, else a `make run` up here)"
    )
    submit.add_argument(
        "--key", default=os.environ.get("OUTLAST_API_KEY", ""), help="API key (default: $OUTLAST_API_KEY)"
    )
    keys_parser = sub.add_parser("keys", help="API keys in DATABASE_URL: create, list, revoke")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key for TENANT and print it, once, on the last line")
    create.add_argument("tenant")
    create.add_argument("--name", default="", help="a label: who holds the key, what for")
    create.add_argument("--read-only", action="store_true", help="the key reads; every write it sends answers 403")
    listing = keys_sub.add_parser("list", help="every key (never the key itself): id, tenant, access, dates, name")
    listing.add_argument("--tenant")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (or the whole key): 401 from then on")
    revoke.add_argument("key")
    tenants_parser = sub.add_parser("tenants", help="tenants in DATABASE_URL: list, limit how many jobs each runs")
    tenants_sub = tenants_parser.add_subparsers(dest="tenants_command", required=True)
    tenants_sub.add_parser("list", help="every tenant: its running jobs and its cap")
    limit = tenants_sub.add_parser("limit", help="cap how many of TENANT's jobs run at once (`default`: the share)")
    limit.add_argument("tenant")
    limit.add_argument("max_running", metavar="MAX_RUNNING", help="a number of jobs (0 pauses it), or `default`")
    webhooks = sub.add_parser("webhooks", help="webhook settings").add_subparsers(dest="what", required=True)
    secret = webhooks.add_parser("secret", help="show TENANT's signing secret (created when it has none)")
    secret.add_argument("tenant")
    secret.add_argument("--rotate", action="store_true", help="make a new secret current")
    secret.add_argument("--overlap", type=float, default=86_400.0, help="seconds the old one keeps signing")
    jobs_cli.add_parsers(sub)
    schedules_cli.register(sub)
    workflows_cli.register(sub, url=server_url())
    args = parser.parse_args(argv)
    if args.command in ("jobs", "types"):
        sys.exit(jobs_cli.run(args))
    if args.command == "schedules":
        sys.exit(schedules_cli.main(args))
    if args.command == "workflows":
        sys.exit(workflows_cli.main(args))
    if args.command == "keys":
        sys.exit({"create": cmd_keys_create, "list": cmd_keys_list, "revoke": cmd_keys_revoke}[args.keys_command](args))
    if args.command == "tenants":
        sys.exit({"list": cmd_tenants_list, "limit": cmd_tenants_limit}[args.tenants_command](args))
    commands = {"run": cmd_run, "migrate": cmd_migrate, "web": cmd_web, "worker": cmd_worker, "submit": cmd_submit}
    commands["webhooks"] = cmd_webhooks
    sys.exit(commands[args.command](args))
