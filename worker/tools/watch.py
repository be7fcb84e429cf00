"""`outlast submit --wait`: follow a job's event stream in a terminal until it ends.

A live progress bar and the job's log lines go to stderr (worker/tools/views.py draws them, as for `outlast jobs
wait`); the finished Job goes to stdout. The stream is resumed with Last-Event-ID whenever it ends early (a
`reconnect` event, a dropped connection), so nothing is missed or shown twice. It reads the stream with the
standard library's HTTP client, but it is no lighter than the rest of the `outlast` command: importing any module
of `worker` runs worker/__init__.py, which loads the engine's dependencies (databases, asyncpg, arq, redis,
msgspec, httpx).
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

from worker.tools.views import JobScreen

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
    screen = JobScreen(job, out=out)
    try:
        return _follow(base, job, screen)
    finally:
        screen.close()


def _follow(base: str, job: dict[str, Any], screen: JobScreen) -> dict[str, Any]:
    last: int | None = None
    failures = 0
    while True:
        try:
            with _open(base + job["links"]["events"], last) as response:
                if response.status == 204:  # nothing after `last`, ever: the job had ended
                    final = _get(base + job["links"]["self"])
                    screen.status(final)
                    return final
                failures = 0
                for event in parse(response):
                    if event.id is not None:
                        last = event.id
                    screen.event(event.name, event.data)
                    if event.name == "status" and event.data["done"]:
                        return dict(event.data)
                # the stream ended early (`reconnect`: its lifetime, or a server shutting down): resume
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{exc.code} {exc.reason}: {exc.read().decode(errors='replace')}") from None
        except (OSError, http.client.HTTPException) as exc:
            failures += 1
            if failures > MAX_RETRIES:
                raise SystemExit(f"lost the event stream of {job['id']}: {exc}") from None
            time.sleep(min(0.25 * 2**failures, 10.0))
