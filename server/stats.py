"""GET /v1/stats: the caller's tenant's queue at a glance (worker/stats.py), the autoscaling and dashboard signal."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from server.auth import tenant_of
from server.responses import MsgspecResponse
from server.state import web_of
from worker import stats
from worker.sweep import fresh_s


async def show(request: Request) -> Response:
    web = web_of(request)
    return MsgspecResponse(await stats.stats(web.deps.db, tenant_of(request), fresh_s=fresh_s(web.config)))
