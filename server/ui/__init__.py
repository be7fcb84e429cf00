"""The dashboard at /ui: server-rendered pages (Jinja2) kept live by the API's event streams, and the actions an
operator needs, each through the API's own handler. Its routes, for server/app.py; the session middleware is
server/ui/session.py's UiAccess."""

from __future__ import annotations

from importlib import resources
from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from server import feed, jobs, stream
from server.problems import NotFound
from server.ui import actions, login, pages

_ASSETS: Final = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no asset {name!r}")
    body = resources.files("server.ui").joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


async def job_result(request: Request) -> Response:
    """A result too large for the page, as a download: GET /v1/jobs/{id}/result's answer."""
    response = await jobs.result(request)
    response.headers["Content-Disposition"] = f'attachment; filename="{request.path_params["id"]}.json"'
    return response


_PAGES: Final[list[BaseRoute]] = [
    Route("/", pages.overview, methods=["GET"]),
    Route("/login", login.show, methods=["GET"]),
    Route("/login", login.sign_in, methods=["POST"]),
    Route("/logout", login.sign_out, methods=["POST"]),
    Route("/events", feed.dashboard_events, methods=["GET"]),  # the tenant feed as rows need it, with the session
    Route("/jobs", pages.jobs_list, methods=["GET"]),
    Route("/jobs/bulk", actions.bulk_confirm, methods=["GET"]),
    Route("/jobs/bulk", actions.bulk_run, methods=["POST"]),
    Route("/jobs/{id}", pages.job_page, methods=["GET"]),
    Route("/jobs/{id}/events", stream.follow, methods=["GET"]),  # the job's own stream
    Route("/jobs/{id}/result", job_result, methods=["GET"]),
    Route("/jobs/{id}/cancel", actions.cancel, methods=["POST"]),
    Route("/jobs/{id}/retry", actions.retry, methods=["POST"]),
    Route("/jobs/{id}/redeliver", actions.redeliver, methods=["POST"]),
    Route("/types", pages.job_types, methods=["GET"]),
    Route("/types/{name}", actions.show_type, methods=["GET"]),
    Route("/types/{name}", actions.submit_job, methods=["POST"]),
    Route("/schedules", pages.schedule_list, methods=["GET"]),
    Route("/schedules/{id}/{action}", actions.schedule_action, methods=["POST"]),
    Route("/workflows", pages.workflow_list, methods=["GET"]),
    Route("/workflows/{id}", pages.workflow_page, methods=["GET"]),
    Route("/workflows/{id}/cancel", actions.cancel_workflow, methods=["POST"]),
    Route("/static/{name}", asset, methods=["GET"]),
]
# Mounted, so its routes are no operations of the API's document (tests/test_openapi.py walks the app's Routes).
ROUTES: Final = [Mount("/ui", routes=_PAGES)]
