"""/v1/jobs/{id}/deliveries: a job's webhook deliveries with every attempt, and redelivery on request."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server import limits
from server.auth import caller_of, tenant_of
from server.jobs import _deps, _get, retry_after
from server.problems import Conflict, JobNotDone
from server.responses import MsgspecResponse
from worker import webhook_store


class DeliveryList(msgspec.Struct, frozen=True):
    items: list[webhook_store.Delivery]


async def list_deliveries(request: Request) -> Response:
    row = await _get(request)
    return MsgspecResponse(DeliveryList(await webhook_store.list_deliveries(_deps(request).db, row.id)))


async def redeliver(request: Request) -> Response:
    """A fresh delivery, or the one already pending: asking again while one waits coalesces into it."""
    config = _deps(request).config
    budget: limits.Budget = request.app.state.redeliver_budget
    per_min = config.redelivers_per_min
    await budget.take(_deps(request).redis, caller_of(request).limit_key, rate=per_min / 60, burst=per_min)
    row = await _get(request)
    if not row.done:
        raise JobNotDone(retry_after(row))
    if row.callback_url is None:
        raise Conflict("the job has no callback_url to deliver to")
    delivery = await webhook_store.redeliver(_deps(request).db, tenant_of(request), row.id)
    if delivery is None:  # deleted by retention between the two statements
        raise Conflict("the job can no longer be delivered")
    headers = {"Location": f"/v1/jobs/{row.id}/deliveries"}
    return MsgspecResponse(delivery, status_code=202, headers=headers)
