"""The dashboard's pages that only read: the overview, the jobs list, a job, the job types, schedules, workflows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import markupsafe
import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server.auth import tenant_of
from server.state import web_of
from server.ui.render import ago, page, stamp
from worker import dashboard, events, resource, schedules, status, store, workflows
from worker.dashboard import Filter
from worker.job import TERMINAL, Progress
from worker.sweep import fresh_s
from worker.webhooks import store as webhook_store

PAGE_SIZE: Final = 50
STATUSES: Final = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
EVENTS_SHOWN: Final = 2_000  # a job's events read for its page: its timeline and log
INLINE_BYTES: Final = 32 * 1024  # a larger input or result is a download, not a block of the page


def not_found(request: Request, what: str = "job") -> Response:
    """The one answer for an unknown id and another tenant's alike."""
    return page(request, "not_found.html", status_code=404, what=what)


def job_id(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def progress_of(row: store.JobRow) -> Progress:
    return msgspec.json.decode(row.progress, type=Progress)


# -- overview ---------------------------------------------------------------------------------------


def chart(minutes: list[tuple[int, int, int]], now: datetime) -> markupsafe.Markup:
    """The last hour as an inline SVG of 60 bars (jobs ended per minute, the failed part in red), built here from
    numbers alone: as template markup, its 120 elements were most of the overview's CPU."""
    this_minute = int(now.timestamp() // 60)
    slots = [(0, 0)] * 60
    for minute, ended, failed in minutes:
        back = this_minute - minute  # 0: this minute
        if 0 <= back < 60:
            slots[59 - back] = (ended, failed)
    top = max(f for f, _ in slots) or 1
    parts = [
        '<svg class="chart" viewBox="0 0 300 48" role="img"'
        ' aria-label="jobs ended per minute over the last hour, failures in red">',
        f"<title>jobs ended per minute, last hour (peak {top})</title>",
        '<line x1="0" y1="44" x2="300" y2="44" class="axis"/>',
    ]
    # Heights in tenths as integers, written with one decimal: float arithmetic and repr cost twice the CPU, and
    # wrote 4.299999999999997.
    for n, (ended, failed) in enumerate(slots):
        if not ended:
            continue
        h = (400 * ended + top // 2) // top
        y = 440 - h
        parts.append(
            f'<rect x="{n * 5}" y="{y // 10}.{y % 10}" width="4" height="{h // 10}.{h % 10}" class="ok">'
            f"<title>{ended} ended, {failed} failed</title></rect>"
        )
        if failed:
            h = (400 * failed + top // 2) // top
            y = 440 - h
            parts.append(
                f'<rect x="{n * 5}" y="{y // 10}.{y % 10}" width="4" height="{h // 10}.{h % 10}" class="fail"/>'
            )
    parts.append("</svg>")
    return markupsafe.Markup("".join(parts))  # numbers only: nothing here comes from a user


async def overview(request: Request) -> Response:
    web = web_of(request)
    found = await dashboard.overview(web.deps.db, tenant_of(request), fresh_s=fresh_s(web.config))
    now = found.stats
    ended = sum(now.last_hour.values())
    return page(
        request,
        "overview.html",
        stats=now,
        chart=chart(found.minutes, datetime.now(UTC)),
        per_minute=ended / 60,
        failure_rate=None if not ended else now.last_hour["failed"] / ended,
        failures=found.failures,
    )


# -- jobs -------------------------------------------------------------------------------------------


def _when(text: str) -> datetime:
    """A datetime-local field's value, read as UTC (the dashboard shows UTC throughout)."""
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def parse_filter(params: dict[str, str]) -> tuple[Filter, dict[str, str]]:
    """The jobs filter a query string asks for, and a message for each field it got wrong."""
    errors: dict[str, str] = {}
    status_ = params.get("status") or None
    if status_ is not None and status_ not in STATUSES:
        errors["status"] = f"one of {', '.join(STATUSES)}"
        status_ = None
    metadata: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in params.get("meta", "").split(","))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            errors["meta"] = "key=value, several separated by commas"
            break
        metadata[key.strip()] = value.strip()
    found: dict[str, datetime | None] = {}
    for name in ("from", "to"):
        try:
            found[name] = _when(params[name]) if params.get(name) else None
        except ValueError:
            errors[name] = "a date and time, e.g. 2026-12-03T10:00"
            found[name] = None
    for name in ("type", "meta"):
        if "\x00" in params.get(name, ""):
            errors[name] = "no NUL characters"
    wanted = Filter(
        status=status_,  # type: ignore[arg-type]
        type=params.get("type") or None,
        metadata=metadata or None,
        created_from=found["from"],
        created_to=found["to"],
    )
    return wanted, errors


async def jobs_list(request: Request) -> Response:
    web, tenant = web_of(request), tenant_of(request)
    params = dict(request.query_params)
    if search := params.get("q", "").strip():
        found = job_id(search)
        if found is not None:
            return RedirectResponse(f"/ui/jobs/{found}", 303)
    wanted, errors = parse_filter(params)
    if search:
        errors["q"] = "a job's id, e.g. 0193b7c2-5f1e-7c3a-9d2e-8f0a1b2c3d4e"
    before = job_id(params.get("before", "")) if params.get("before") else None
    rows = [] if errors else await dashboard.find_jobs(web.deps.db, tenant, wanted, limit=PAGE_SIZE + 1, before=before)
    now = datetime.now(UTC)
    shown = rows[:PAGE_SIZE]
    keep = {k: v for k, v in params.items() if k in ("status", "type", "meta", "from", "to") and v}
    return page(
        request,
        "jobs.html",
        status_code=422 if errors else 200,
        rows=markupsafe.Markup("\n".join(row_html(row, now) for row in shown)),
        next_before=shown[-1].id if len(rows) > PAGE_SIZE else None,
        newer=dashboard.id_at(now),  # a job with a greater id was created after this page was read
        params=params,
        keep=keep,
        errors=errors,
        statuses=STATUSES,
        types=sorted(web.job_types),
        bulk_cancel=wanted.status in (None, "queued", "running"),
        bulk_retry=wanted.status in (None, "failed", "cancelled", "expired"),
    )


def row_html(row: store.JobRow, now: datetime) -> str:
    """A row of the jobs list as markup, built here rather than by the template: 50 rows through Jinja cost more
    CPU than the whole of GET /v1/jobs?limit=50 (bench/dashboard.py). The same cells as the template's tables, and
    what static/app.js updates (data-job, data-status, data-bar, data-attempt)."""
    text, kind, status = str(row.id), markupsafe.escape(row.type), row.status  # status: one of six words
    pct = round(100 * progress_of(row).fraction, 1)
    return (
        f'<tr data-job="{text}"><td data-label="id"><a href="/ui/jobs/{text}"><code title="{text}">{text[:8]}…'
        f'{text[-4:]}</code></a></td><td data-label="type">{kind}</td><td data-label="status" data-status>'
        f'<span class="status s-{status}">{status}</span></td><td data-label="progress"><span class="bar"'
        f' data-bar="{text}"><progress max="100" value="{pct}">{int(pct)} %</progress> <span class="pct">'
        f'{int(pct)} %</span></span></td><td data-label="attempt" data-attempt>{row.attempt} / {row.max_attempts}'
        f'</td><td data-label="created" title="{stamp(row.created_at)}">{ago(row.created_at, now)} ago</td></tr>'
    )


class Attempt(msgspec.Struct):
    n: int
    statuses: list[tuple[str, datetime | None, str]]  # (status, when, note)
    error: Any = None


def timeline(row: store.JobRow, found: list[events.Event]) -> tuple[list[Attempt], list[Any], int]:
    """A job's attempts, each with its status changes and the error it ended with; its log lines; its progress
    events."""
    attempts: dict[int, Attempt] = {}
    log: list[Any] = []
    progress = 0
    for event in found:
        if event.name == "log":
            log.append(msgspec.json.decode(event.data))
        elif event.name == "progress":
            progress += 1
        else:
            change = status.decode(event.data)
            attempt = attempts.setdefault(change.attempt, Attempt(change.attempt, []))
            # A retry's `queued` says when it runs again instead; started_at is still the failed attempt's.
            when = change.finished_at if change.status in TERMINAL else change.started_at
            when = None if change.status == "queued" else when
            note = "" if change.next_run_at is None else f"again at {change.next_run_at:%H:%M:%S}"
            attempt.statuses.append((change.status, when if isinstance(when, datetime) else None, note))
            if change.error is not None:
                attempt.error = change.error
    return list(attempts.values()), log, progress


async def job_page(request: Request) -> Response:
    web, tenant = web_of(request), tenant_of(request)
    db = web.deps.db
    found = job_id(request.path_params["id"])
    row = None if found is None else await store.get_job(db, tenant, found)
    if row is None:
        return not_found(request)
    job = resource.as_job(row)
    attempts, log, progressed = timeline(row, await events.read_after(db, row.id, 0, limit=EVENTS_SHOWN))
    parent = None if row.parent_id is None else await store.get_job(db, tenant, row.parent_id)
    return page(
        request,
        "job.html",
        row=row,
        job=job,
        attempts=attempts,
        log=log,
        progressed=progressed,
        deliveries=await webhook_store.list_deliveries(db, row.id),
        children=await dashboard.children(db, tenant, row.id),
        retries=await dashboard.retries(db, tenant, row.id),
        parent=parent,
        input_large=len(row.input) > INLINE_BYTES,
        result_large=row.result is not None and len(row.result) > INLINE_BYTES,
        can_cancel=not row.done,
        can_retry=row.status in ("failed", "cancelled", "expired"),
        can_redeliver=row.done and row.callback_url is not None,
    )


# -- job types, schedules, workflows ----------------------------------------------------------------


async def job_types(request: Request) -> Response:
    return page(request, "types.html", types=web_of(request).job_type_list.items)


async def schedule_list(request: Request) -> Response:
    rows = await schedules.list_schedules(web_of(request).deps.db, tenant_of(request), limit=500)
    return page(request, "schedules.html", schedules=[schedules.as_resource(r) for r in rows])


async def workflow_list(request: Request) -> Response:
    rows = await dashboard.recent_workflows(web_of(request).deps.db, tenant_of(request))
    return page(request, "workflows.html", workflows=rows)


async def workflow_page(request: Request) -> Response:
    db, tenant = web_of(request).deps.db, tenant_of(request)
    found = job_id(request.path_params["id"])
    workflow = None if found is None else await workflows.get(db, tenant, found)
    if found is None or workflow is None:
        return not_found(request, "workflow")
    nodes = await dashboard.steps(db, tenant, found)
    return page(request, "workflow.html", workflow=workflow, layers=dashboard.layers(nodes))
