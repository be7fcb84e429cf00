"""`outlast workflows submit|get|watch|cancel`: workflows over the HTTP API, with an API key, as `outlast submit`
does for a job (docs/workflows.md). `watch` redraws the steps in place until the workflow ends."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich.live import Live

from worker.tools.api import request_json
from worker.tools.views import console, workflow_view

POLL_S = 0.5
EXIT_FAILED = 1  # `watch` and `submit --wait`: the workflow ended other than succeeded


def register(sub: Any, *, url: str) -> None:
    """`workflows`, on the `outlast` command's subparsers; `url`: the web to talk to by default."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=url, help="the web (default: $OUTLAST_URL, else a `make run` up here)")
    common.add_argument("--key", default=os.environ.get("OUTLAST_API_KEY", ""), help="API key ($OUTLAST_API_KEY)")
    one = argparse.ArgumentParser(add_help=False, parents=[common])
    one.add_argument("id", help="the workflow's id")
    parser = sub.add_parser("workflows", help="workflows over the API: submit, get, watch, cancel")
    commands = parser.add_subparsers(dest="workflows_command", required=True)
    submit = commands.add_parser("submit", parents=[common], help="submit a workflow from a JSON file (- for stdin)")
    submit.add_argument("file", help='{"steps": [...], "metadata": {...}}, as POST /v1/workflows takes it')
    submit.add_argument("--wait", action="store_true", help="watch it until it ends")
    submit.add_argument("--idempotency-key", help="the same key again answers the workflow it made")
    commands.add_parser("get", parents=[one], help="the workflow, as JSON")
    commands.add_parser("watch", parents=[one], help="its steps, live, until it ends: exit 0 if it succeeded")
    commands.add_parser("cancel", parents=[one], help="end it cancelled: nothing of it starts any more")


def main(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    if args.workflows_command == "submit":
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{args.file} is not JSON: {exc}") from None
        key = args.idempotency_key or str(uuid.uuid4())
        workflow = request_json(f"{base}/v1/workflows", key=args.key, body=body, headers={"Idempotency-Key": key})
        if not args.wait:
            print(json.dumps(workflow, indent=2))
            return 0
        return watch(base, args.key, workflow["id"])
    if args.workflows_command == "get":
        print(json.dumps(request_json(f"{base}/v1/workflows/{args.id}", key=args.key), indent=2))
        return 0
    if args.workflows_command == "cancel":
        workflow = request_json(f"{base}/v1/workflows/{args.id}/cancel", key=args.key, body={})
        print(json.dumps(workflow, indent=2))
        return 0
    return watch(base, args.key, args.id)


def watch(base: str, key: str, workflow_id: str) -> int:
    """Poll the workflow every POLL_S, redrawn in place on a terminal (printed once at the end elsewhere); the ended
    Workflow as JSON on stdout when that is not a terminal."""
    screen = console(sys.stderr)
    workflow = request_json(f"{base}/v1/workflows/{workflow_id}", key=key)
    if screen.is_terminal:
        with Live(workflow_view(workflow), console=screen, auto_refresh=False) as live:
            while not workflow["done"]:
                time.sleep(POLL_S)
                workflow = request_json(f"{base}/v1/workflows/{workflow_id}", key=key)
                live.update(workflow_view(workflow), refresh=True)
    else:
        while not workflow["done"]:
            time.sleep(POLL_S)
            workflow = request_json(f"{base}/v1/workflows/{workflow_id}", key=key)
        screen.print(workflow_view(workflow, bars=False))
    if not sys.stdout.isatty():  # for a script; a person has just read the table
        print(json.dumps(workflow, indent=2))
    return 0 if workflow["status"] == "succeeded" else EXIT_FAILED
