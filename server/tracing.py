"""The submit span: a request that makes jobs (POST /v1/jobs, /v1/jobs/batch, /v1/jobs/{id}/retry, /v1/workflows)
runs inside a SERVER span, a child of the caller's `traceparent` when it sent a valid one (an invalid one is ignored,
as W3C Trace Context asks of a receiver), and the jobs it makes store that span's context (worker/tracing.py): a
workflow's later steps take their upstream steps'. Reads, streams and polls make no span: a trace is the life of a
job, not of every GET on it."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import tracing

_RETRY = re.compile(r"/v1/jobs/[^/]+/retry")
_ROUTES = {"/v1/jobs": "/v1/jobs", "/v1/jobs/batch": "/v1/jobs/batch", "/v1/workflows": "/v1/workflows"}


def route(path: str) -> str | None:
    """The route template of a path that makes jobs; None for any other."""
    if path in _ROUTES:
        return _ROUTES[path]
    return "/v1/jobs/{id}/retry" if _RETRY.fullmatch(path) else None


class Traced:
    """Pure ASGI: the span is current in the request's task, so the handler, its INSERT and its doorbell are in it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        template = route(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if template is None or not tracing.on():
            await self.app(scope, receive, send)
            return
        carrier = {
            name: value.decode("latin-1")
            for key, value in scope["headers"]
            if (name := key.decode("latin-1")) in ("traceparent", "tracestate")
        }

        async def answering(message: Message) -> None:
            if message["type"] == "http.response.start":
                location = dict(message.get("headers", [])).get(b"location", b"").decode("latin-1")
                job_id = location.removeprefix("/v1/jobs/") if location.startswith("/v1/jobs/") else ""
                tracing.answered(message["status"], server=True, job_id=job_id)
            await send(message)

        with tracing.incoming("POST", template, carrier):
            await self.app(scope, receive, answering)
