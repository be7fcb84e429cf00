"""The `outlast` command: run (everything, for development), migrate, web, worker, submit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from worker.config import from_env
from worker.migrate import create_database, migrate
from worker.watch import follow

WEB = "{python} -m uvicorn --factory server.app:create_app --host {host} --port {port} --loop uvloop --http httptools"
WORKER = "{python} -m arq worker.settings.WorkerSettings"


def _migrate(dsn: str) -> None:
    async def both() -> list[str]:
        await create_database(dsn)
        return await migrate(dsn)

    applied = asyncio.run(both())
    print("migrations: " + (", ".join(applied) if applied else "up to date"), file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> int:
    _migrate(from_env().database_url)
    return 0


def _exec(command: str) -> int:
    argv = shlex.split(command)
    os.execvp(argv[0], argv)  # the platform's signals reach uvicorn / arq directly


def cmd_web(args: argparse.Namespace) -> int:
    return _exec(WEB.format(python=sys.executable, host=args.host, port=from_env().port))


def cmd_worker(args: argparse.Namespace) -> int:
    return _exec(WORKER.format(python=sys.executable))


def cmd_run(args: argparse.Namespace) -> int:
    """Web + worker together; an embedded PostgreSQL / Valkey for whichever URL is not set."""
    from honcho.manager import Manager

    env = dict(os.environ)
    data = Path(env.get("OUTLAST_DATA_DIR", ".outlast")).resolve()
    with contextlib.ExitStack() as stack:
        if not env.get("DATABASE_URL") or not env.get("REDIS_URL"):
            data.mkdir(parents=True, exist_ok=True)
            from worker.embedded import EmbeddedPostgres, EmbeddedValkey
        if not env.get("DATABASE_URL"):
            postgres = stack.enter_context(EmbeddedPostgres(data / "postgres"))
            env["DATABASE_URL"] = postgres.dsn("outlast")
            print(f"embedded PostgreSQL: {env['DATABASE_URL']} (data in {data / 'postgres'})", file=sys.stderr)
        if not env.get("REDIS_URL"):
            valkey = stack.enter_context(EmbeddedValkey(data / "valkey"))
            env["REDIS_URL"] = valkey.url()
            print(f"embedded Valkey: {env['REDIS_URL']} (append-only file in {data / 'valkey'})", file=sys.stderr)
        _migrate(env["DATABASE_URL"])
        port = env.setdefault("PORT", "8000")
        url = f"http://127.0.0.1:{port}"
        print(
            f"\nOutlast on {url}  (API docs: {url}/docs; Ctrl-C stops everything)\n"
            f"  curl -si -X POST {url}/v1/jobs -H 'content-type: application/json' "
            """-d '{"type": "square_sum", "input": {"data": [1, 2, 3]}}'\n"""
            f"  outlast submit sleep '{{\"seconds\": 5}}' --wait --url {url}\n",
            file=sys.stderr,
            flush=True,
        )
        manager = Manager()
        manager.add_process("web", WEB.format(python=sys.executable, host="127.0.0.1", port=port), env=env)
        manager.add_process("worker", WORKER.format(python=sys.executable), env=env)
        manager.loop()
    return int(manager.returncode or 0)


def _request(url: str, *, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise SystemExit(f"{exc.code} {exc.reason}: {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"cannot reach {url}: {exc.reason}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"INPUT is not JSON: {exc}") from None
    base = args.url.rstrip("/")
    job = _request(f"{base}/v1/jobs", body={"type": args.type, "input": payload})
    if args.wait:
        job = follow(base, job)
    print(json.dumps(job, indent=2))
    return 0 if not args.wait or job["status"] == "succeeded" else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="outlast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start everything for development (embedded stores when no URLs are set)")
    sub.add_parser("migrate", help="apply migrations/ to DATABASE_URL (the Procfile's release step)")
    web = sub.add_parser("web", help="run the HTTP server on $PORT")
    web.add_argument("--host", default="0.0.0.0")
    sub.add_parser("worker", help="run an arq worker")
    submit = sub.add_parser("submit", help="submit a job and print it")
    submit.add_argument("type")
    submit.add_argument("input", help="the job's input as JSON")
    submit.add_argument("--wait", action="store_true", help="follow its progress and log until the job is done")
    submit.add_argument("--url", default=os.environ.get("OUTLAST_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "migrate": cmd_migrate, "web": cmd_web, "worker": cmd_worker, "submit": cmd_submit}
    sys.exit(commands[args.command](args))
