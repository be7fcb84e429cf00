"""/v1/jobs/{id}/deliveries: a job's webhook deliveries with every attempt, and redelivery on request."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.auth import caller_of, tenant_of
from server.jobs import job_or_404, retry_after
from server.problems import Conflict, JobNotDone
from server.responses import MsgspecResponse
from server.state import web_of
from worker import webhook_store


class DeliveryList(msgspec.Struct, frozen=True):
    items: list[webhook_store.Delivery]


async def list_deliveries(request: Request) -> Response:
    row = await job_or_404(request)
    return MsgspecResponse(DeliveryList(await webhook_store.list_deliveries(web_of(request).deps.db, row.id)))


async def redeliver(request: Request) -> Response:
    """A fresh delivery, or the one already pending: asking again while one waits coalesces into it."""
    web = web_of(request)
    row = await job_or_404(request)  # an unknown job costs no redelivery
    per_min = web.config.redelivers_per_min
    await web.redeliveries.take(web.deps.redis, caller_of(request).limit_key, rate=per_min / 60, burst=per_min)
    if not row.done:
        raise JobNotDone(retry_after(row))
    if row.callback_url is None:
        raise Conflict("the job has no callback_url to deliver to")
    delivery = await webhook_store.redeliver(web.deps.db, tenant_of(request), row.id)
    if delivery is None:  # deleted by retention between the two statements
        raise Conflict("the job can no longer be delivered")
    headers = {"Location": f"/v1/jobs/{row.id}/deliveries"}
    return MsgspecResponse(delivery, status_code=202, headers=headers)
