"""GET /metrics: the web's counters and gauges, the engine's (worker/metrics.py) and the queue's gauges from the
table, in the Prometheus text format; and the middleware that counts requests.

The web's own metrics are one registry per app, so that an app built twice in one process (the tests) starts from
zero. With several uvicorn workers (`python -m server` then turns prometheus-client's multiprocess mode on) every
process writes its values to a shared directory and a scrape reads the sum of all, whichever process answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.follow import Hub
from server.state import web_of
from worker import metrics as engine
from worker.database import UNAVAILABLE


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
            "outlast_open_streams",
            "Event streams (GET /v1/jobs/{id}/events) open now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.followed_jobs = Gauge(
            "outlast_followed_jobs",
            "Jobs that streams and long polls follow now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.subscribed = Gauge(
            "outlast_events_subscribed",
            "Web processes whose Redis subscription to job events is up",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.queue = engine.QueueGauges()

    def sample(self, hub: Hub) -> None:
        """Read the hub's state into its gauges: at each scrape, and every few seconds where another process may
        answer the scrape (set_function's gauges would be read from no file in multiprocess mode)."""
        self.followed_jobs.set(hub.followed)
        self.subscribed.set(float(hub.subscribed))


@contextlib.asynccontextmanager
async def sampling(metrics: Metrics, hub: Hub, *, every_s: float = 5.0) -> AsyncIterator[None]:
    """In multiprocess mode, keep this process's hub gauges fresh for the scrapes the others answer."""
    if engine.multiprocess_dir() is None:
        yield
        return

    async def loop() -> None:
        while True:
            metrics.sample(hub)
            await asyncio.sleep(every_s)

    task = asyncio.create_task(loop(), name="outlast-metrics-sample")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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
    web = web_of(request)
    web.metrics.sample(web.hub)
    with contextlib.suppress(*UNAVAILABLE):  # the queue's gauges keep their last reading through an outage
        await web.metrics.queue.refresh(web.deps.db)
    body = engine.exposition([web.metrics.registry, engine.REGISTRY], web.metrics.queue)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
