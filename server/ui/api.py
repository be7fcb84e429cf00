"""The dashboard's changes go through the API's own handlers (server/jobs.py, submit.py, bulk.py, ...), called
in-process with the session's caller: the same checks, limits, metrics and answers as a client's request, and no
second copy of any of it. A refusal is the handler's ProblemError, which the page shows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.ui.session import replay

Handler = Callable[[Request], Awaitable[Response]]
_DROPPED = {b"content-type", b"content-length", b"idempotency-key", b"prefer", b"last-event-id"}


async def call(
    request: Request, handler: Handler, *, path_params: dict[str, str] | None = None, body: Any = None
) -> Any:
    """POST to `handler` as the session's caller, with `body` as its JSON; what it answered, decoded (None for
    no body)."""
    encoded = b"" if body is None else msgspec.json.encode(body)
    headers = [(k, v) for k, v in request.scope["headers"] if k not in _DROPPED]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(encoded)).encode())]
    scope = {**request.scope, "method": "POST", "headers": headers, "path_params": path_params or {}}
    scope["query_string"] = b""
    response = await handler(Request(scope, replay(encoded)))
    return msgspec.json.decode(response.body) if response.body else None
