"""X-Request-ID: taken from the request when it is a sane token (a proxy's or a client's), else made here; echoed
on the response and set for every log line of the request (worker/logs.py), the access line included."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import logs

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")  # what may go into a log line as it is


class RequestId:
    """Pure ASGI, outermost, so that even a 401 or a 429 carries the id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SANE.fullmatch(given) else uuid.uuid4().hex
        # Not reset afterwards: uvicorn runs each request in a task of its own, and the traceback of an error this
        # request raised is logged outside this middleware, which should name the request too.
        logs.request_id.set(rid)

        async def echoing(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        await self.app(scope, receive, echoing)
