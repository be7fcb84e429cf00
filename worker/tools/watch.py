"""`outlast submit --wait`: follow a job's event stream in a terminal until it ends.

A live progress bar and the job's log lines go to stderr; the finished Job goes to stdout. The stream is
resumed with Last-Event-ID whenever it ends early (a `reconnect` event, a dropped connection), so nothing is
missed or shown twice. It reads the stream with the standard library's HTTP client, but it is no lighter than the
rest of the `outlast` command: importing any module of `worker` runs worker/__init__.py, which loads the engine's
dependencies (databases, asyncpg, arq, redis, msgspec, httpx).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

READ_TIMEOUT_S = 60.0  # well above the server's keep-alive interval (at most 15 s)
MAX_RETRIES = 8  # consecutive failed connections before giving up


@dataclass(frozen=True)
class Event:
    name: str
    data: Any
    id: int | None


def parse(lines: Iterable[bytes]) -> Iterator[Event]:
    """Server-Sent Events from raw lines: fields until a blank line; comments (keep-alives) skipped."""
    fields: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if "data" in fields:
                seq = fields.get("id", "")
                yield Event(fields.get("event", "message"), json.loads(fields["data"]), int(seq) if seq else None)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value


class Screen:
    """The progress bar on one line, with log lines printed above it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.job: dict[str, Any] = {}
        self.progress: dict[str, Any] = {"fraction": 0.0, "message": None}

    def bar(self) -> str:
        fraction = float(self.progress["fraction"])
        filled = int(fraction * 30)
        message = self.progress["message"] or ""
        status = self.job.get("status", "")
        return f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} {status:<9} {message[:40]:<40}"

    def show(self) -> None:
        print(self.bar(), end="", file=self.out, flush=True)

    def line(self, text: str) -> None:
        print(f"\r{' ' * 90}\r{text}", file=self.out)
        self.show()

    def event(self, event: Event) -> None:
        if event.name == "status":
            self.job = event.data
            self.progress = event.data["progress"]
            retry = event.data.get("retry")
            if retry:
                error = retry.get("error") or {}
                why = f"{error.get('type')}: {error.get('message')}" if error else "its worker was lost"
                self.line(f"attempt {event.data['attempt']} failed ({why}); retrying at {retry['next_run_at']}")
        elif event.name == "progress":
            self.progress = event.data
        elif event.name == "log":
            self.line(f"{event.data['level']:<7} {event.data['message']}")
        self.show()


def _open(url: str, last_event_id: int | None) -> http.client.HTTPResponse:
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = str(last_event_id)
    response: http.client.HTTPResponse = urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=READ_TIMEOUT_S
    )
    return response


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response:
        job: dict[str, Any] = json.load(response)
        return job


def follow(base: str, job: dict[str, Any], *, out: TextIO = sys.stderr) -> dict[str, Any]:
    """Show the job's events until its terminal status event; return the Job that event carries."""
    screen = Screen(out)
    screen.job, screen.progress = job, job["progress"]
    screen.show()
    last: int | None = None
    failures = 0
    while True:
        try:
            with _open(base + job["links"]["events"], last) as response:
                if response.status == 204:  # nothing after `last`, ever: the job had ended
                    final = _get(base + job["links"]["self"])
                    break
                failures = 0
                for event in parse(response):
                    if event.id is not None:
                        last = event.id
                    screen.event(event)
                    if event.name == "status" and event.data["done"]:
                        print(file=out)
                        return dict(event.data)
                # the stream ended early (`reconnect`: its lifetime, or a server shutting down): resume
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{exc.code} {exc.reason}: {exc.read().decode(errors='replace')}") from None
        except (OSError, http.client.HTTPException) as exc:
            failures += 1
            if failures > MAX_RETRIES:
                raise SystemExit(f"lost the event stream of {job['id']}: {exc}") from None
            time.sleep(min(0.25 * 2**failures, 10.0))
    screen.job, screen.progress = final, final["progress"]
    screen.show()
    print(file=out)
    return final
