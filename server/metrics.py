"""GET /metrics: this process's counters and gauges in the Prometheus text format, and the middleware that counts
requests.

One registry per app, not prometheus_client's global one: each web process is scraped on its own (as uvicorn
workers and dynos are), and an app built twice in one process (the tests) starts from zero.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.follow import Hub
from server.state import web_of


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "outlast_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.submitted = Counter(
            "outlast_jobs_submitted", "Jobs accepted by POST /v1/jobs, by type", ["type"], registry=self.registry
        )
        self.open_streams = Gauge(
            "outlast_open_streams", "Event streams (GET /v1/jobs/{id}/events) open now", registry=self.registry
        )
        self.followed_jobs = Gauge(
            "outlast_followed_jobs",
            "Jobs that streams and long polls in this process follow now",
            registry=self.registry,
        )
        self.subscribed = Gauge(
            "outlast_events_subscribed",
            "1 while this process's Redis subscription to job events is up",
            registry=self.registry,
        )

    def watch(self, hub: Hub) -> None:
        self.followed_jobs.set_function(lambda: hub.followed)
        self.subscribed.set_function(lambda: float(hub.subscribed))


class CountRequests:
    """Pure ASGI (BaseHTTPMiddleware would buffer streams): counts each response when it starts, so a stream
    counts once it is open; labelled by route template, so ids don't make new series."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter
        self._children: dict[tuple[str, str, str], Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self._count(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            if not started:  # the server answers 500 outside this middleware
                self._count(scope, 500)
            raise

    def _count(self, scope: Scope, status: int) -> None:
        labels = (scope["method"], getattr(scope.get("route"), "path", "unmatched"), str(status))
        child = self._children.get(labels)
        if child is None:  # `labels()` validates and takes a lock on every call: once per series is enough
            child = self._children[labels] = self.counter.labels(*labels)
        child.inc()


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = web_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
