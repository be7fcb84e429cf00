"""create_app(config) -> Starlette: the whole URL map, the lifespan and the error handlers.

Run it with `python -m server` (server/__main__.py), which names it as a factory, so importing this module reads
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from server import (
    accesslog,
    auth,
    bulk,
    collector,
    deliveries,
    docs,
    feed,
    jobs,
    limits,
    openapi,
    ops,
    problems,
    schedules,
    stats,
    stream,
    submit,
    ui,
    uploads,
    workflows,
)
from server.follow import Hub
from server.metrics import CountRequests, Metrics, metrics, sampling
from server.requestid import RequestId
from server.state import Web
from server.tracing import Traced
from server.ui.session import UiAccess
from worker import Config, UrlGuard, connect, from_env, load_job_types, tracing
from worker.connections import tls as redis_tls
from worker.database import session_url
from worker.webhooks.ssrf import Resolver, system_resolver

_ALLOWED_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "Prefer", "X-Request-ID"]
_ALLOWED_HEADERS += ["traceparent", "tracestate"]  # W3C Trace Context: a browser's trace goes on into its jobs
_EXPOSED_HEADERS = ["Location", "Retry-After", "Idempotent-Replayed", "Preference-Applied", "X-Request-ID"]


def create_app(config: Config | None = None, *, resolver: Resolver = system_resolver) -> Starlette:
    """The web app. `resolver` answers the callback_url guard's DNS lookups (tests give one that answers what an
    attacker would)."""
    config = config or from_env()
    accesslog.install()
    tracing.setup(config, service="outlast-web")
    job_types = load_job_types(config.job_modules)
    counters = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with connect(config) as deps:
            hub = Hub(
                deps.db,
                config.redis_url,
                poll_s=config.events_poll_s,
                timeout_s=config.redis_timeout_s,
                tls=redis_tls(config),
            )
            async with hub, sampling(counters, hub):
                app.state.web = web = Web(
                    config=config,
                    deps=deps,
                    hub=hub,
                    feeds=feed.Feeds(deps.db, hub),
                    auth=await auth.setup(config, deps.db),
                    callbacks=UrlGuard.from_config(config, resolver),  # and again at each delivery (the worker's)
                    inserts=submit.inserts(deps.db),
                    enqueues=submit.enqueues(deps.redis, step_s=config.priority_step_s),
                    submits=limits.Budget("submits"),
                    redeliveries=limits.Budget("redeliveries"),
                    metrics=counters,
                    job_types=job_types,
                    job_type_list=jobs.job_type_list(job_types, config.default_max_attempts),
                    openapi=openapi.build(job_types),
                )
                async with web.auth.keys.listening(session_url(config), deps.db, timeout_s=config.db_timeout_s):
                    collector.settle()
                    yield

    app = Starlette(
        routes=[
            # Matched in order: the two routes every client hits most come first.
            Route("/v1/jobs/{id}", jobs.show, methods=["GET"]),
            Route("/v1/jobs", submit.submit, methods=["POST"]),
            Route("/v1/jobs/batch", submit.submit_batch, methods=["POST"]),
            Route("/v1/jobs/cancel", bulk.cancel_many, methods=["POST"]),
            Route("/v1/jobs", jobs.list_jobs, methods=["GET"]),
            Route("/v1/jobs/{id}/result", jobs.result, methods=["GET"]),
            Route("/v1/jobs/{id}/cancel", jobs.cancel, methods=["POST"]),
            Route("/v1/jobs/{id}/retry", submit.retry, methods=["POST"]),
            Route("/v1/jobs/{id}/deliveries", deliveries.list_deliveries, methods=["GET"]),
            Route("/v1/jobs/{id}/deliveries/redeliver", deliveries.redeliver, methods=["POST"]),
            Route("/v1/jobs/{id}/events", stream.follow, methods=["GET"]),
            Route("/v1/events", feed.events, methods=["GET"]),
            Route("/v1/job-types", jobs.job_types, methods=["GET"]),
            Route("/v1/schedules", schedules.list_schedules, methods=["GET"]),
            Route("/v1/schedules", schedules.create, methods=["POST"]),
            Route("/v1/schedules/{id}", schedules.show, methods=["GET"]),
            Route("/v1/schedules/{id}", schedules.change, methods=["PATCH"]),
            Route("/v1/schedules/{id}", schedules.delete, methods=["DELETE"]),
            Route("/v1/schedules/{id}/trigger", schedules.trigger, methods=["POST"]),
            Route("/v1/workflows", workflows.submit, methods=["POST"]),
            Route("/v1/workflows/{id}", workflows.show, methods=["GET"]),
            Route("/v1/workflows/{id}/events", workflows.follow, methods=["GET"]),
            Route("/v1/workflows/{id}/cancel", workflows.cancel, methods=["POST"]),
            Route("/v1/stats", stats.show, methods=["GET"]),
            Route("/v1/uploads", uploads.create, methods=["POST"]),
            Route("/healthz", ops.healthz, methods=["GET"]),
            Route("/readyz", ops.readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi.openapi, methods=["GET"]),
            Route("/docs", docs.page, methods=["GET"]),
            Route("/docs/assets/{name}", docs.asset, methods=["GET"]),
            *ui.ROUTES,  # the dashboard (server/ui/)
        ],
        middleware=[
            Middleware(RequestId),  # outermost: every answer carries its X-Request-ID, and every log line of it
            Middleware(Traced),  # the submit span, when tracing is on (server/tracing.py)
            Middleware(CountRequests, counter=counters.requests),  # 401s and 429s are counted too
            # Before authentication: a browser's preflight carries no credentials, and is answered here.
            Middleware(
                CORSMiddleware,
                allow_origins=[o.strip() for o in config.cors_origins.split(",") if o.strip()],
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=_ALLOWED_HEADERS,
                expose_headers=_EXPOSED_HEADERS,
                max_age=3600,
            ),
            Middleware(auth.Authenticate),  # every /v1 route, present or future, is authenticated here
            Middleware(UiAccess),  # and every /ui route by its session (server/ui/session.py)
        ],
        exception_handlers=problems.HANDLERS,
        lifespan=lifespan,
    )
    return app
