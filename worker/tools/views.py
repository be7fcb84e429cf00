"""What the `outlast` commands show a person: tables of jobs and job types, one job in full, and the live views (a
job's progress bar with its log lines above it; every live job, each with its bar). Drawn with rich: it sizes
columns to the terminal, redraws a live view in place without flicker, and prints plain lines when the output is
not a terminal (a CI log, a pipe).

A job is given as the API's JSON (builtins), so the views show alike what the store holds (`outlast jobs`) and
what an event stream carries (`outlast submit --wait`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

Job = Mapping[str, Any]  # the Job resource as JSON builtins (API.md), with `tenant` when an operator reads it
STATUS_STYLE = {
    "waiting": "dim",
    "ready": "cyan",
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "expired": "dim",
}
LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}
PIPE_WIDTH = 200  # a table written to a pipe or file: wide enough that no column wraps


def console(file: TextIO | None = None) -> Console:
    """A console on `file` (stdout): the terminal's width, or PIPE_WIDTH and no colour when it is not one."""
    file = file or sys.stdout
    terminal = file.isatty()
    return Console(file=file, width=None if terminal else PIPE_WIDTH, highlight=False, soft_wrap=not terminal)


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def took(job: Job, now: datetime | None = None) -> str:
    """How long it ran (started to finished), or has run so far; `-` before it started."""
    if not job.get("started_at"):
        return "-"
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else (now or datetime.now(UTC))
    seconds = max(0.0, (end - start).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def duration(seconds: int) -> str:
    """A limit in the largest unit that states it exactly: 60 s, 10 min, 24 h."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def bar(fraction: float, width: int = 20) -> ProgressBar:
    # rich's default colour for a bar under way is its red-pink, which reads as an error beside a status
    return ProgressBar(total=1.0, completed=fraction, width=width, complete_style="cyan", finished_style="green")


def progress_line(fraction: float, message: str | None, width: int = 30) -> Table:
    """A bar, its percentage and the job's own message, on one line."""
    line = Table.grid(padding=(0, 1))
    line.add_row(bar(fraction, width), f"{fraction:6.1%}", Text(message or "", overflow="ellipsis", no_wrap=True))
    return line


def short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def jobs_table(jobs: Iterable[Job], *, bars: bool = True) -> Table:
    """Jobs, one a row; `bars`: a progress bar beside each percentage (a terminal's; a pipe gets the number)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    names = ["id", "tenant", "type", "status", "progress", *([""] if bars else []), "attempt", "created (UTC)", "took"]
    for name in names:
        table.add_column(name, justify="right" if name in ("", "attempt", "took") else "left", no_wrap=True)
    for job in jobs:
        fraction = float(job["progress"]["fraction"])
        table.add_row(
            str(job["id"]), job.get("tenant", ""), job["type"], status_text(job["status"]),
            *([bar(fraction, 12)] if bars else []), f"{fraction:.0%}", f"{job['attempt']}/{job['max_attempts']}",
            _when(job["created_at"]), took(job),
        )  # fmt: skip
    return table


def job_panel(job: Job) -> Table:
    """One job, field by field."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    progress = job["progress"]
    fraction = float(progress["fraction"])
    rows: list[tuple[str, RenderableType]] = [
        ("id", str(job["id"])),
        ("tenant", job.get("tenant", "")),
        ("type", job["type"]),
        ("status", status_text(job["status"])),
        ("progress", progress_line(fraction, progress.get("message"))),
        ("attempt", f"{job['attempt']} of {job['max_attempts']} (each at most {duration(job['timeout_s'])})"),
        ("created", _when(job["created_at"])),
        ("started", _when(job["started_at"])),
        ("finished", _when(job["finished_at"])),
        ("took", took(job)),
        ("expires", _when(job["expires_at"]) if not job["done"] else "-"),
        ("input", short(job["input"])),
        ("metadata", short(job["metadata"])),
    ]
    if job.get("retry_of"):
        rows.append(("retry of", str(job["retry_of"])))
    if job.get("callback_url"):
        rows.append(("callback", job["callback_url"]))
    if job.get("error"):
        error = job["error"]
        retryable = " (retryable)" if error.get("retryable") else ""
        rows.append(("error", Text(f"{error['type']}: {error['message']}{retryable}", style="red")))
    if job["status"] == "succeeded":
        rows.append(("result", "deleted (past its retention)" if job["result"] is None else short(job["result"])))
    for name, value in rows:
        grid.add_row(Text(name, style="bold"), value)
    return grid


def types_table(types: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("type", "retry-safe", "timeout", "attempts", "input", "description"):
        table.add_column(name, no_wrap=name != "description")
    for t in types:
        fields = ", ".join(t["input_schema"].get("$defs", {}).get(_ref(t["input_schema"]), {}).get("properties", {}))
        table.add_row(
            t["name"], "yes" if t["retry_safe"] else "no", duration(t["timeout_s"]), str(t["max_attempts"]),
            fields or "-", t["description"],
        )  # fmt: skip
    return table


def _ref(schema: Mapping[str, Any]) -> str:
    return str(schema.get("$ref", "")).rpartition("/")[2]


def ended_text(job: Job) -> Text:
    """A job that has ended, on one line: which, how, after how long, and why when it failed."""
    text = Text.assemble(str(job["id"]), " ", job["type"], " ", status_text(job["status"]), f" after {took(job)}")
    if job.get("error"):
        text.append(f": {job['error']['type']}: {job['error']['message']}", style="red")
    return text


def ended_line(job: Job) -> str:
    return ended_text(job).plain


class JobScreen:
    """One job, live: a progress bar redrawn in place on a terminal, with its log lines and retries printed above it.
    Elsewhere (a pipe, a CI log) each line is printed once and the bar only at the end."""

    def __init__(self, job: Job, *, out: TextIO | None = None) -> None:
        self.console = console(out or sys.stderr)
        self.job: Job = job
        self.progress: Mapping[str, Any] = job["progress"]
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        tenant = f", tenant {job['tenant']}" if job.get("tenant") else ""
        self.console.print(Text.assemble((str(job["id"]), "bold"), f" ({job['type']}{tenant})"))
        if self.console.is_terminal:
            self._live.start()

    def _render(self) -> Table:
        fraction = float(self.progress["fraction"])
        line = Table.grid(padding=(0, 1))
        line.add_row(
            bar(fraction, 30), f"{fraction:6.1%}", status_text(f"{self.job['status']:<9}"),
            Text(self.progress.get("message") or "", overflow="ellipsis", no_wrap=True),
        )  # fmt: skip
        return line

    def _redraw(self) -> None:
        if self.console.is_terminal:
            self._live.update(self._render(), refresh=True)

    def line(self, text: Text | str) -> None:
        self.console.print(text)
        self._redraw()

    def status(self, job: Job) -> None:
        before, self.job, self.progress = self.job, job, job["progress"]
        retry = job.get("retry")
        if retry:
            error = retry.get("error") or {}
            why = f"{error.get('type')}: {error.get('message')}" if error else "its worker was lost"
            at = datetime.fromisoformat(retry["next_run_at"]).astimezone(UTC)
            self.line(Text(f"attempt {job['attempt']} failed ({why}); retrying at {at:%H:%M:%S} UTC", "yellow"))
        elif job["status"] == "running" and before.get("attempt") != job["attempt"] and job["attempt"] > 1:
            self.line(f"attempt {job['attempt']} of {job['max_attempts']} started")
        self._redraw()

    def progressed(self, progress: Mapping[str, Any]) -> None:
        self.progress = progress
        self._redraw()

    def log(self, level: str, message: str) -> None:
        self.line(Text.assemble((f"{level:<7}", LEVEL_STYLE.get(level, "")), " ", message))

    def event(self, name: str, data: Any) -> None:
        """An event as a stream carries it: `status` (the Job), `progress` or `log`."""
        if name == "status":
            self.status(data)
        elif name == "progress":
            self.progressed(data)
        elif name == "log":
            self.log(data["level"], data["message"])

    def close(self) -> None:
        if self.console.is_terminal:
            self._redraw()
            self._live.stop()
        else:
            self.console.print(self._render())


class BoardScreen:
    """Every live job, each with its bar, redrawn in place; a line above for each job as it ends."""

    def __init__(self, *, out: TextIO | None = None) -> None:
        self.console = console(out or sys.stderr)
        self._live = Live(console=self.console, auto_refresh=False, transient=True)
        if self.console.is_terminal:
            self._live.start()

    def show(self, jobs: list[Job], *, more: bool = False) -> None:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for name in ("id", "tenant", "type", "status", "progress", "", "message", "attempt", "running for"):
            table.add_column(name, no_wrap=True, justify="right" if name in ("", "attempt", "running for") else "left")
        for job in jobs:
            fraction = float(job["progress"]["fraction"])
            table.add_row(
                str(job["id"]), job.get("tenant", ""), job["type"], status_text(job["status"]), bar(fraction, 20),
                f"{fraction:.0%}", Text(job["progress"].get("message") or "", overflow="ellipsis"),
                f"{job['attempt']}/{job['max_attempts']}", took(job),
            )  # fmt: skip
        footer = Text("… and more (--limit shows more)", style="dim") if more else Text("")
        if self.console.is_terminal:
            self._live.update(Group(table, footer), refresh=True)

    def ended(self, job: Job) -> None:
        self.console.print(ended_text(job))

    def close(self) -> None:
        if self.console.is_terminal:
            self._live.stop()


def workflow_table(workflow: Mapping[str, Any], *, bars: bool = True) -> Table:
    """A workflow's steps, one a row: its status, and how many of its jobs have ended (and how) of how many."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ["step", "status", "jobs", *([""] if bars else []), "ended", "of them"]:
        table.add_column(name, justify="right" if name in ("jobs", "", "ended") else "left", no_wrap=True)
    for name, step in workflow["steps"].items():
        counts: Mapping[str, int] = step.get("counts", {})
        total = len(step["job_ids"])
        ended = sum(n for status, n in counts.items() if status in ("succeeded", "failed", "cancelled", "expired"))
        fraction = ended / total if total else (1.0 if step["status"] == "succeeded" else 0.0)
        how = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        table.add_row(
            name, status_text(step["status"]), str(total), *([bar(fraction, 20)] if bars else []),
            f"{fraction:.0%}", how or "-",
        )  # fmt: skip
    return table


def workflow_view(workflow: Mapping[str, Any], *, bars: bool = True) -> Group:
    """The workflow's headline (id, status, how long), its steps, and why it failed when it did."""
    started = datetime.fromisoformat(workflow["created_at"])
    ended = datetime.fromisoformat(workflow["finished_at"]) if workflow.get("finished_at") else datetime.now(UTC)
    head = Text.assemble(
        (str(workflow["id"]), "bold"),
        "  ",
        status_text(workflow["status"]),
        f"  {(ended - started).total_seconds():.1f} s",
    )
    parts: list[RenderableType] = [head, workflow_table(workflow, bars=bars)]
    if workflow.get("error"):
        parts.append(Text(why_ended(workflow["error"]), "red"))
    return Group(*parts)


def why_ended(error: Mapping[str, Any]) -> str:
    """A workflow's `error` as a sentence: the step, and its job's error or the workflow's own."""
    job_error = error.get("error") or {}
    if error.get("job_id"):
        what = f"{job_error.get('type')}: {job_error.get('message')}" if job_error else "no error recorded"
        return f"step {error.get('step')}: job {error['job_id']} {error.get('status')} ({what})"
    where = f"step {error['step']}: " if error.get("step") else ""
    return f"{where}{error.get('type')}: {error.get('message')}"
