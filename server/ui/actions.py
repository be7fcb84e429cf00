"""The dashboard's changes: submit from a job type's form, cancel, retry, redeliver, the bulk actions, a schedule's
pause, resume and trigger. Each goes through the API's own handler (server/ui/api.py); the session middleware has
already checked the CSRF token and refused a read-only key's."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode
from uuid import UUID

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server import bulk, deliveries, jobs, schedules, submit, workflows
from server.auth import tenant_of
from server.problems import NotFound, ProblemError, ValidationError
from server.state import web_of
from server.ui import api, forms
from server.ui.pages import not_found, parse_filter
from server.ui.render import page
from worker import dashboard
from worker.bulk import MAX_CANCEL

LIVE = ["queued", "running"]
RETRYABLE = ["failed", "cancelled", "expired"]


async def form_of(request: Request) -> dict[str, str]:
    return dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))


def back(to: str, **said: str) -> Response:
    return RedirectResponse(f"{to}?{urlencode(said)}" if said else to, 303)


def type_form(request: Request, name: str, **context: Any) -> Response:
    info = next((t for t in web_of(request).job_type_list.items if t.name == name), None)
    if info is None:
        return not_found(request, "job type")
    context.setdefault("values", {})
    context.setdefault("errors", {})
    status_code = 422 if context["errors"] else 200
    return page(
        request, "type.html", status_code=status_code, info=info, fields=forms.fields(info.input_schema), **context
    )


async def show_type(request: Request) -> Response:
    return type_form(request, request.path_params["name"])


async def submit_job(request: Request) -> Response:
    name = request.path_params["name"]
    info = next((t for t in web_of(request).job_type_list.items if t.name == name), None)
    if info is None:
        return not_found(request, "job type")
    form = await form_of(request)
    found = forms.fields(info.input_schema)
    value, errors = forms.read(form, found)
    if not errors:
        try:
            made = await api.call(request, submit.submit, body={"type": name, "input": value})
        except ValidationError as exc:
            for error in exc.errors or []:
                errors.setdefault(forms.field_of(error.loc), error.msg)
            errors = errors or {"input": exc.detail or "the input does not fit the schema"}
        except ProblemError as exc:
            return type_form(request, name, values=form, problem=exc.detail or exc.title)
        else:
            return back(f"/ui/jobs/{made['id']}", said="submitted")
    return type_form(request, name, values=form, errors=errors)


async def _on_job(request: Request, handler: api.Handler, said: str) -> Response:
    job_id = request.path_params["id"]
    try:
        answer = await api.call(request, handler, path_params={"id": job_id})
    except NotFound:
        return not_found(request)
    except ProblemError as exc:
        return back(f"/ui/jobs/{job_id}", problem=exc.detail or exc.title)
    # A retry answers the new job, a redelivery its delivery (of this job), a cancel this job.
    target = (answer.get("job_id") or answer.get("id")) if isinstance(answer, dict) else job_id
    return back(f"/ui/jobs/{target}", said=said)


async def cancel(request: Request) -> Response:
    return await _on_job(request, jobs.cancel, "cancel asked")


async def retry(request: Request) -> Response:
    return await _on_job(request, submit.retry, "retried")


async def redeliver(request: Request) -> Response:
    return await _on_job(request, deliveries.redeliver, "redelivery queued")


# -- bulk -------------------------------------------------------------------------------------------


def _plan(action: str, wanted: dashboard.Filter) -> tuple[list[str], int, bool]:
    """The statuses the action takes, its cap, and whether it is one POST /v1/jobs/cancel (whose filter has no
    created range) rather than one call per job."""
    if action == "cancel":
        statuses: list[str] = [str(wanted.status)] if wanted.status in LIVE else LIVE
        whole = wanted.created_from is None and wanted.created_to is None
        return statuses, MAX_CANCEL if whole else dashboard.MAX_BULK, whole
    statuses = [str(wanted.status)] if wanted.status in RETRYABLE else RETRYABLE
    return statuses, dashboard.MAX_BULK, False


async def bulk_confirm(request: Request) -> Response:
    params = dict(request.query_params)
    action = params.get("action", "")
    wanted, errors = parse_filter(params)
    if action not in ("cancel", "retry") or errors:
        return back("/ui/jobs", problem="choose cancel or retry on a valid filter")
    statuses, cap, _ = _plan(action, wanted)
    count = await dashboard.count_matching(web_of(request).deps.db, tenant_of(request), wanted, statuses, cap=cap)
    keep = {k: v for k, v in params.items() if k in ("status", "type", "meta", "from", "to") and v}
    return page(request, "bulk.html", action=action, count=count, cap=cap, statuses=statuses, keep=keep)


async def bulk_run(request: Request) -> Response:
    form = await form_of(request)
    action = form.get("action", "")
    wanted, errors = parse_filter(form)
    if action not in ("cancel", "retry") or errors:
        return back("/ui/jobs", problem="choose cancel or retry on a valid filter")
    statuses, cap, whole = _plan(action, wanted)
    keep = urlencode({k: v for k, v in form.items() if k in ("status", "type", "meta", "from", "to") and v})
    if whole:
        body = {"status": wanted.status, "type": wanted.type, "metadata": wanted.metadata or {}}
        try:
            done = (await api.call(request, bulk.cancel_many, body=body))["cancelled"]
        except ProblemError as exc:
            return RedirectResponse(f"/ui/jobs?{keep}&{urlencode({'problem': exc.detail or exc.title})}", 303)
        return RedirectResponse(f"/ui/jobs?{keep}&{urlencode({'said': f'{done} jobs cancelled'})}", 303)
    ids = await dashboard.matching_ids(web_of(request).deps.db, tenant_of(request), wanted, statuses, limit=cap)
    handler = jobs.cancel if action == "cancel" else submit.retry
    done, refused = 0, 0
    for job_id in ids:
        try:
            await api.call(request, handler, path_params={"id": str(job_id)})
            done += 1
        except ProblemError:  # ended meanwhile, or a limit: counted and said
            refused += 1
    said = f"{done} jobs {'cancelled' if action == 'cancel' else 'retried'}" + (
        f", {refused} refused" if refused else ""
    )
    return RedirectResponse(f"/ui/jobs?{keep}&{urlencode({'said': said})}", 303)


# -- schedules, workflows ---------------------------------------------------------------------------


async def schedule_action(request: Request) -> Response:
    schedule_id, action = request.path_params["id"], request.path_params["action"]
    try:
        if action == "trigger":
            made = await api.call(request, schedules.trigger, path_params={"id": schedule_id})
            return back(f"/ui/jobs/{made['id']}", said="triggered")
        if action not in ("pause", "resume"):
            return not_found(request, "action")
        await api.call(request, schedules.change, path_params={"id": schedule_id}, body={"paused": action == "pause"})
    except NotFound:
        return not_found(request, "schedule")
    except ProblemError as exc:
        return back("/ui/schedules", problem=exc.detail or exc.title)
    return back("/ui/schedules", said=f"{schedule_id}: {'paused' if action == 'pause' else 'resumed'}")


async def cancel_workflow(request: Request) -> Response:
    workflow_id = request.path_params["id"]
    try:
        UUID(workflow_id)
        await api.call(request, workflows.cancel, path_params={"id": workflow_id})
    except (ValueError, NotFound):
        return not_found(request, "workflow")
    except ProblemError as exc:
        return back(f"/ui/workflows/{workflow_id}", problem=exc.detail or exc.title)
    return back(f"/ui/workflows/{workflow_id}", said="cancel asked")
