"""/v1/jobs/{id}/deliveries: a job's webhook deliveries with every attempt."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.jobs import _deps, _get
from server.responses import MsgspecResponse
from worker import webhook_store


class DeliveryList(msgspec.Struct, frozen=True):
    items: list[webhook_store.Delivery]


async def list_deliveries(request: Request) -> Response:
    row = await _get(request)
    return MsgspecResponse(DeliveryList(await webhook_store.list_deliveries(_deps(request).db, row.id)))
